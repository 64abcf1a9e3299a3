"""Start a server as a child process on 127.0.0.1, wait until /health answers, and always stop it.

    with vllm_server("smollm2-135m") as (url, pid): ...
    with stub_server() as (url, pid): ...
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from core.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise UserError(f"the server at {url} was not healthy within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM spawns engine processes), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def _server(cmd: list[str], port: int, timeout_s: float, log: Path | None, env: dict | None = None
            ) -> Iterator[tuple[str, int]]:
    out = open(log, "w") if log else subprocess.DEVNULL
    # Its own session, so stop() can signal the whole group; the repo root as cwd, so `-m benchmarks` imports.
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parent.parent)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout_s)
        yield url, proc.pid
    finally:
        stop(proc)
        if log:
            out.close()


def vllm_server(model: str = "smollm2-135m", port: int | None = None, timeout_s: float = 300.0,
                log: Path | None = None, max_model_len: int = 2048, extra: list[str] = ()):
    """vLLM's OpenAI server (CPU or GPU build) serving `model` under its registry name."""
    from core.loading import find_model_dir
    port = port or free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(find_model_dir(model)),
           "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--seed", "0", *extra]
    return _server(cmd, port, timeout_s, log, {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})


def stub_server(tokens: int = 16, port: int | None = None, timeout_s: float = 60.0):
    """The instant stub server (benchmarks/stub_server.py) in its own process, so it never shares our GIL."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "benchmarks", "stub-server", "--port", str(port), "--tokens", str(tokens)]
    return _server(cmd, port, timeout_s, None)
