"""What else happened during a slow engine step: Triton compilations, garbage collection, CUDA allocator events.

A serving run's latency tail often comes from a handful of steps that take a second instead of milliseconds, and
the step's own work rarely explains them. Three usual causes can be counted from inside the process:

- Triton compiles a @triton.jit kernel the first time it meets a new combination of compile-time arguments
  (constexprs, and integer arguments' divisibility by 16 unless `do_not_specialize`): hundreds of ms each;
- Python's cyclic garbage collector stops the world, longer the more objects the process holds;
- the CUDA caching allocator calls cudaMalloc when no cached block fits, and when even that fails it frees every
  cached block and retries (an "alloc retry"), which synchronises the device.

engines/profile_steps.py prints the slowest steps with these; optimization/online.py keeps them per run.
"""
from __future__ import annotations

import contextlib
import gc
import time

import torch


def allocator_events() -> tuple[int, int]:
    """(cudaMalloc calls, alloc retries) so far in this process; zeros without CUDA."""
    if not torch.cuda.is_available():
        return 0, 0
    stats = torch.cuda.memory_stats()
    return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)


class StallTrace:
    """While `active()`, collects Triton compilations and garbage-collector time; `take()` returns and resets them."""

    def __init__(self):
        self.compiled: list[str] = []
        self.gc_ms, self._gc_t0 = 0.0, 0.0

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_ms += (time.perf_counter() - self._gc_t0) * 1e3

    @contextlib.contextmanager
    def active(self):
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:  # no Triton, nothing of it to compile
            JITFunction = None
        compile_ = getattr(JITFunction, "_do_compile", None)  # Triton 3.x: every compilation of a @triton.jit kernel

        def traced(fn, *args, **kwargs):
            t0 = time.perf_counter()
            kernel = compile_(fn, *args, **kwargs)
            self.compiled.append(f"{fn.__name__} ({(time.perf_counter() - t0) * 1e3:.0f} ms)")
            return kernel

        if compile_ is not None:
            JITFunction._do_compile = traced
        gc.callbacks.append(self._on_gc)
        try:
            yield self
        finally:
            gc.callbacks.remove(self._on_gc)
            if compile_ is not None:
                JITFunction._do_compile = compile_

    def take(self) -> dict:
        out = {"triton_compiles": self.compiled, "gc_ms": round(self.gc_ms, 2)}
        self.compiled, self.gc_ms = [], 0.0
        return out
