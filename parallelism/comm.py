"""Process groups for this chapter: gloo on CPU, NCCL on CUDA, one code path for both.

Under `torchrun --nproc-per-node N` every process reads its rank and the world size from the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `run_local` starts such a group on this machine without
torchrun, which the tests and the measurement script use.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from core.loading import resolve_device


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group described by the environment; returns (rank, world_size, this rank's device).

    Without torchrun's variables it is a group of one, so every script also runs as a plain `python` command.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    if world > 1 and dev.type == "cpu":
        # N ranks on a few cores: one thread each, or they fight over the cores and every timing is noise.
        torch.set_num_threads(1)
    return rank, world, dev


def rank_zero_first(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, then on the others: a one-time cache fill (converting the default model) done by one process."""
    if dist.get_rank() == 0:
        result = fn()
    dist.barrier()
    if dist.get_rank() != 0:
        result = fn()
    return result


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        # Plain pickle copies tensors into the message; multiprocessing's own pickler would share them through
        # file descriptors that vanish when this process exits before the parent reads them.
        queue.put((rank, pickle.dumps(fn(*args)), None))
    except BaseException:  # report to the parent rather than hang it
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 600) -> list[Any]:
    """Run fn(*args) in `world_size` fresh processes forming a gloo group on 127.0.0.1; returns each rank's result.

    fn must be a module-level function and call `init_distributed()` itself (as a torchrun script would).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            try:
                rank, result, error = queue.get(timeout=1.0)
            except queue_module.Empty:  # keep waiting unless a rank died without a word or time ran out
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"process group failed (exit codes {dead}, or timed out)") from None
                continue
            if error:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(result)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
