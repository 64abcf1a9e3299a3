"""Triton's CPU interpreter for the kernel tests. It must be switched on before Triton is imported, so each check runs
in a fresh Python process, with the repository and tests/ importable, and fails with that process's error output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str, timeout: int = 300) -> None:
    """Run `code` (which imports its checks from a test module) with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    prelude = f"import sys, torch; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
