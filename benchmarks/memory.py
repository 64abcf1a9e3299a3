"""Peak memory of a serving process while a run is in flight, sampled from a background thread.

CPU: resident set size of a process and all its children (vLLM runs its engine in child processes).
GPU: device memory in use on the current CUDA device (total - free), which counts every process on the device, so
run one server per GPU when you read it.
"""
from __future__ import annotations

import os
import threading

import psutil


class PeakMemory:
    """with PeakMemory(pid) as m: ...  ->  m.peak_mb (MB, max over samples every interval_s)."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.2, cuda: bool = False):
        self.pid, self.interval_s, self.cuda = pid or os.getpid(), interval_s, cuda
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_mb(self) -> float:
        if self.cuda:
            import torch
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
        try:
            proc = psutil.Process(self.pid)
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
        except psutil.Error:
            return 0.0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.sample_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        # A fresh thread per `with`, so one sampler can time several runs and keep the overall peak.
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.sample_mb())
