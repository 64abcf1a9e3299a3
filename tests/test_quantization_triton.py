"""Our Triton INT8/INT4 matrix-vector kernels against the float reference (the modules' dequantized weights).

Triton's CPU interpreter runs the kernel code here; it must be switched on before Triton is imported, so the checks
run in a fresh process. On a GPU, quantization/gpu_bench.py reports the same error for the compiled kernels."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantization.linear import Int4Linear, Int8Linear

ROOT = Path(__file__).resolve().parents[1]


def check_kernels() -> None:
    from quantization.triton_gemv import int4_matvec, int8_matvec
    torch.manual_seed(0)
    for n, k, rows in [(40, 256, 1), (24, 320, 3)]:  # N not a multiple of the channel block; K not of BLOCK_K
        linear = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(rows, k)
        q8 = Int8Linear.from_linear(linear)
        expected = x @ q8.dequantized_weight().T
        torch.testing.assert_close(int8_matvec(x, q8.qweight, q8.scales), expected, rtol=1e-4, atol=1e-4)
        for group_size, symmetric in [(64, False), (32, True)]:
            q4 = Int4Linear.from_linear(linear, group_size, symmetric)
            expected = x @ q4.dequantized_weight().T
            got = int4_matvec(x, q4.qweight, q4.scales, q4.zeros, group_size)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # A wrong nibble order or group index is far outside these bounds: swap the nibbles and it must fail.
    swapped = (q4.qweight >> 4) | ((q4.qweight & 0xF) << 4)
    assert not torch.allclose(int4_matvec(x, swapped, q4.scales, q4.zeros, 32), expected, atol=1e-2)


def test_triton_matvec_kernels_match_dequantized_reference_interpreted():
    pytest.importorskip("triton")
    if torch.cuda.is_available():  # the GPU test below checks the compiled kernels there
        pytest.skip("on a GPU machine the compiled kernels are checked instead (its older Triton's interpreter "
                    "fails on this kernel's index arithmetic)")
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
            "from test_quantization_triton import check_kernels\ncheck_kernels()\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
def test_triton_backend_matches_dequant_on_gpu():
    linear = torch.nn.Linear(512, 96, bias=True).cuda().to(torch.bfloat16)
    x = torch.randn(2, 1, 512, device="cuda", dtype=torch.bfloat16)
    for module in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 128)):
        expected = module(x)  # the dequant backend
        module.backend = "triton"
        torch.testing.assert_close(module(x), expected, rtol=2e-2, atol=2e-2)
