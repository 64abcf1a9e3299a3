"""`LLM`: the offline API, shaped like vLLM's (`LLM(model=...)`, `generate(prompts, params)`)."""
from __future__ import annotations

import time

from tqdm import tqdm

from core.generate import SamplingParams
from engines.ours.llm_engine import LLMEngine
from engines.ours.outputs import RequestOutput


class LLM(LLMEngine):
    """Offline batch generation on top of the step API (add_request / step / abort, inherited)."""

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """All prompts arrive now; returns one finished RequestOutput per prompt, in prompt order."""
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        now = time.perf_counter()
        ids = [self.add_request(None, p, sp, arrival_time=now).request_id for p, sp in zip(prompts, per_prompt)]
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while self.has_unfinished_requests():
                for out in self.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]
