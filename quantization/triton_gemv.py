"""Weight-only INT8 and INT4 matrix-vector kernels in Triton: read the packed weights once, never a float copy.

At batch 1 a decode step is y = x @ W^T for a single row x, so its time is the time to read W. PyTorch's built-in
INT8 kernel (`_weight_int8pack_mm`) is far slower than BF16 at one row on an H100, and the "dequant" backend writes
a float copy of W before multiplying, so neither gets the 2x (INT8) or 4x (INT4) fewer bytes that quantization
promises. These kernels load packed codes, widen them in registers, and multiply-accumulate in float32:

- each program owns BLOCK_N output channels of one input row and walks K a block at a time;
- INT8: y[n] = s[n] * sum_k q[n, k] x[k] (the per-channel scale applied once, at the end);
- INT4: codes are two per byte (even k in the low nibble, our packing); each byte's two codes get their group's
  scale and zero, y[n] = sum_k (q[n, k] - z[n, k // G]) s[n, k // G] x[k]. The scales are re-read per byte, from
  cache: they are 1/64 of the bytes at group size 128.
- products accumulate in a [BLOCK_N, BLOCK_K] tile of registers and are summed across K once, at the end.

They are for a few rows (decode): the modules in linear.py send more than MATVEC_MAX_ROWS rows to dequantize + cuBLAS,
which is compute-bound there anyway. Checked against the float reference in tests/test_quantization_triton.py (Triton's CPU interpreter)
and on a GPU by quantization/gpu_bench.py's kernel-error column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _int8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    # Products pile up per lane; one reduction across K at the end instead of one per tile.
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + row * K + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
    s = tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + n, (tl.sum(acc, axis=1) * s).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_B: tl.constexpr):
    row = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for b0 in range(0, K // 2, BLOCK_B):  # a tile of BLOCK_B bytes = 2 * BLOCK_B inputs, possibly several groups
        b = b0 + tl.arange(0, BLOCK_B)  # byte b holds inputs 2b (low nibble) and 2b + 1 (high nibble)
        b_ok = b < K // 2
        ok = n_ok[:, None] & b_ok[None, :]
        x_even = tl.load(x_ptr + row * K + 2 * b, mask=b_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + row * K + 2 * b + 1, mask=b_ok, other=0.0).to(tl.float32)
        packed = tl.load(w_ptr + n[:, None] * (K // 2) + b[None, :], mask=ok, other=0).to(tl.int32)
        g = (2 * b) // GROUP  # both nibbles of a byte share a group (GROUP is even)
        s = tl.load(s_ptr + n[:, None] * groups + g[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * groups + g[None, :], mask=ok, other=0).to(tl.float32)
        lo = (packed & 0xF).to(tl.float32) - z
        hi = (packed >> 4).to(tl.float32) - z
        acc += s * (lo * x_even[None, :] + hi * x_odd[None, :])
    tl.store(y_ptr + row * N + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)


# On a GPU the block of channels per program and the warps are tuned once per weight shape (during the warm-up, before
# any CUDA-graph capture); Triton's CPU interpreter, which the tests use, cannot time kernels and takes one config.
CONFIGS_INT8 = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                for n, k in ((4, 512), (8, 256), (8, 512), (16, 256)) for w in (4, 8)]
CONFIGS_INT4 = [triton.Config({"BLOCK_N": n, "BLOCK_B": b}, num_warps=w)
                for n, b in ((4, 256), (8, 128), (8, 256), (16, 128)) for w in (4, 8)]
_int8_tuned = triton.autotune(configs=CONFIGS_INT8, key=["N", "K"])(_int8_kernel)
_int4_tuned = triton.autotune(configs=CONFIGS_INT4, key=["N", "K", "GROUP"])(_int4_kernel)


def _launch(tuned, plain, x: torch.Tensor, N: int, M: int, *args, **plain_config) -> None:
    if x.is_cuda:
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args)
    else:
        plain[(triton.cdiv(N, plain_config["BLOCK_N"]), M)](*args, **plain_config)


def int8_matvec(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (a few rows), qweight int8 [N, K], scales [N] -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _launch(_int8_tuned, _int8_kernel, x, N, M, x.contiguous(), qweight, scales, y, N, K, BLOCK_N=16, BLOCK_K=128)
    return y


def int4_matvec(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] (a few rows), qweight uint8 [N, K/2] (low nibble first), scales [N, G], zeros uint8 [N, G]."""
    M, K = x.shape
    N = qweight.shape[0]
    if group_size % 2:
        raise ValueError(f"the Triton INT4 kernel takes even group sizes (got {group_size})")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _launch(_int4_tuned, _int4_kernel, x, N, M, x.contiguous(), qweight, scales, zeros, y, N, K, group_size,
            BLOCK_N=16, BLOCK_B=64)
    return y
