"""transformers `generate` with static batching: the baseline every speed-up is measured against.

Requests run in batches of --max-batch-size in workload order, all arriving at t=0, left-padded with an explicit
attention mask. A batch runs until its longest request is done, as static batching does; each request's tokens are
timed by a StoppingCriteria that transformers calls once per decode step, and a request counts only its own first
output_len tokens (or up to its EOS without ignore_eos). With ignore_eos, EOS is not a stop token for the batch.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from core.loading import find_model_dir, resolve_device, resolve_dtype

from benchmarks.backends.base import Backend, RequestRecord, RequestSpec
from benchmarks.memory import PeakMemory


class _StepTimer:
    """A StoppingCriteria that records the time of every decode step and never stops generation itself."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFBackend(Backend):
    name, online = "hf", False

    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None, max_batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.model_dir = model if os.path.isdir(model) else str(find_model_dir(model))
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        self.max_batch_size = max_batch_size
        self.memory = PeakMemory(cuda=self.device.type == "cuda")

    @torch.inference_mode()
    def _batch(self, batch: list[RequestSpec], t0: float) -> list[RequestRecord]:
        from transformers import StoppingCriteriaList
        enc = self.tokenizer([s.prompt for s in batch], return_tensors="pt", padding=True).to(self.device)
        timer = _StepTimer()
        ignore_eos = all(s.ignore_eos for s in batch)
        eos = self.model.generation_config.eos_token_id
        out = self.model.generate(**enc, max_new_tokens=max(s.output_len for s in batch), do_sample=False,
                                  stopping_criteria=StoppingCriteriaList([timer]),
                                  eos_token_id=None if ignore_eos else eos,
                                  pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc.input_ids.shape[1]:].tolist()
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        records = []
        for spec, ids in zip(batch, new):
            n = min(spec.output_len, len(ids), len(timer.times))
            if not spec.ignore_eos:  # count up to and including this row's first EOS
                n = next((i + 1 for i, t in enumerate(ids[:n]) if t in eos_ids), n)
            records.append(RequestRecord.from_token_times(spec, t0, timer.times[:n],
                                                          self.tokenizer.decode(ids[:n], skip_special_tokens=True)))
        return records

    def run_batch(self, specs: list[RequestSpec]) -> list[RequestRecord]:
        t0 = time.perf_counter()
        records: list[RequestRecord] = []
        with self.memory:
            for i in range(0, len(specs), self.max_batch_size):
                batch = specs[i:i + self.max_batch_size]
                try:
                    records += self._batch(batch, t0)
                except Exception as e:  # record, don't crash the run
                    records += [RequestRecord(s.prompt_len, error=f"{type(e).__name__}: {e}", start_s=t0)
                                for s in batch]
        return records

    def peak_memory_mb(self) -> float | None:
        return self.memory.peak_mb

    def describe(self) -> dict:
        import transformers
        return {"backend": self.name, "model": self.model_dir, "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device.type, "max_batch_size": self.max_batch_size, "batching": "static",
                "transformers_version": transformers.__version__}


def from_args(args: argparse.Namespace) -> HFBackend:
    return HFBackend(args.model, args.device, args.dtype, args.max_batch_size)
