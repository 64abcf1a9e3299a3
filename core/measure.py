"""Measuring helpers: peak memory of a piece of work (device memory on a GPU, resident set size on a CPU), the GPU
time of a CUDA-graph replay, and the worst of several error checks."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import signal
import statistics
import sys
from typing import Any, Callable

import torch

from core.errors import UserError


def worst_error(errors) -> float:
    """The largest of these errors (floats or 0-dim tensors), NaN if any is NaN: Python's max(0.0, nan) is 0.0, and
    a kernel or path that returns NaNs must not pass a check as exact."""
    errors = [float(e) for e in errors]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _child(fn, args, queue):
    if hasattr(os, "setpgrp"):  # a process group of its own, so the parent can end whatever this run starts
        os.setpgrp()
    try:
        result = fn(*args)
        queue.put((result, peak_rss_mb(), None))
    except UserError as e:  # bad input or a missing package: the parent says it in one line, as the child would
        queue.put((None, peak_rss_mb(), e))
    except BaseException as e:  # report, don't hang the parent
        queue.put((None, peak_rss_mb(), f"{type(e).__name__}: {e}"))


def _end_group(proc) -> None:
    """End the child and every process it started that is still there. vLLM's engine core runs in a process of its
    own; when the child that made it was ended in its exit handlers, the engine lived on (3 GB and a core busy,
    after the case study had finished)."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=5)
    if hasattr(os, "killpg"):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # nothing left in the group
            pass
    if proc.is_alive():  # interrupted before it made its group, and deaf to SIGTERM
        proc.kill()
    proc.join()


def run_isolated(fn: Callable[..., Any], *args) -> tuple[Any, float]:
    """Run fn(*args) in a fresh process; return (its result, its peak RSS in MB).

    Peak RSS only ever grows within a process, so comparing two variants honestly needs one process each.
    fn must be a module-level function (it is pickled to a spawned process).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    try:
        while True:
            try:
                result, peak, error = queue.get(timeout=1.0)
                break
            except Exception:  # queue.Empty: keep waiting unless the child died without reporting
                if not proc.is_alive():
                    raise RuntimeError(f"isolated run of {fn.__name__} died (exit code {proc.exitcode})") from None
        # The result is in hand. Some libraries hang in their exit handlers (vLLM's CPU engine in a spawned child
        # did, for an hour): give the child a few seconds to exit, then end it.
        proc.join(timeout=15)
    finally:  # also on Ctrl-C or an error here: leave nothing running
        _end_group(proc)
    if isinstance(error, UserError):
        raise error
    if error:
        raise RuntimeError(f"isolated run failed: {error}")
    return result, peak


def gpu_peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def graph_replay_us(fn, warmup: int, repeats: int) -> float:
    """Median GPU time in microseconds of fn replayed as a CUDA graph, as a serving engine runs its steps, with L2
    flushed before each replay.

    Launched from Python, a Triton kernel's launch costs tens of microseconds of CPU time, as long as the kernel
    itself at these sizes, and it would be timed as GPU idle time; a graph replay launches everything at once.
    """
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # larger than any L2 (50 MB on an H100)
    fn()  # compiles Triton kernels, builds kernel layouts: never inside a capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        flush.zero_()  # evicts the operands from L2: they come from HBM, as in a model whose layers stream through
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
