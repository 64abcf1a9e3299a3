"""Weight-only INT8 and INT4 matrix-vector kernels in Triton: read the packed weights once, never a float copy.

At batch 1 a decode step is y = x @ W^T for a single row x, so its time is the time to read W. PyTorch's built-in
INT8 kernel (`_weight_int8pack_mm`) is far slower than BF16 at one row on an H100, and the "dequant" backend writes
a float copy of W before multiplying, so neither gets the 2x (INT8) or 4x (INT4) fewer bytes that quantization
promises. These kernels load packed codes as 32-bit words, widen them in registers, and multiply-accumulate in
float32:

- each program owns BLOCK_N output channels of one input row and walks K a tile of BLOCK_W words at a time, loading
  the next tile before it computes on this one (twice the bytes in flight: reading W is the whole cost);
- a word holds 8 INT4 codes (our packing, read little-endian: code i of word j is input 8j + i) or 4 INT8 codes;
- codes become floats without an int-to-float conversion, which runs at an eighth of the FMA rate on an H100 and
  would cost as much as reading the weights: OR-ing a code c sitting at bit 4i into the bits of the float 2^23
  gives the float 2^23 + c * 16^i exactly (one AND-OR instruction), minus 2^23 is c * 16^i, and the 16^-i goes into
  x instead (exact: a power of two). Codes above bit 16 are shifted down first, once per word;
- INT4: y[n] = sum_g s[n, g] (sum_{k in g} q[n, k] x[k] - z[n, g] sum_{k in g} x[k]): a tile holds whole groups,
  so each group's scale and zero are read and applied once, to its two sums (groups of 8 to 512 inputs, powers
  of two); INT8: y[n] = s[n] sum_k q x (q + 128 unsigned: the same trick, with 128 sum x taken off).

They are for a few rows (decode): the modules in linear.py send more rows elsewhere. Checked against the float
reference in tests/test_quantization_triton.py (Triton's CPU interpreter) and on a GPU by quantization/gpu_bench.py's
kernel-error column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TWO_23 = tl.constexpr(8388608.0)  # 2^23: the float whose low 23 bits are its mantissa's


@triton.jit
def _as_float(word, mask: tl.constexpr):
    """(word & mask) as a float + 2^23, exact when mask lies within the low 23 bits."""
    return ((word & mask) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _tile(w_ptr, n, n_ok, W, j):
    """Words j of rows n (zeros past either end): [BLOCK_N, BLOCK_W]."""
    return tl.load(w_ptr + n[:, None] * W + j[None, :], mask=n_ok[:, None] & (j < W)[None, :], other=0)


@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, W, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_W: tl.constexpr):
    WORDS_PER_GROUP: tl.constexpr = GROUP // 8
    BLOCK_G: tl.constexpr = BLOCK_W // WORDS_PER_GROUP  # whole groups per tile: a tile starts on a group boundary
    row = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    words = _tile(w_ptr, n, n_ok, W, tl.arange(0, BLOCK_W))
    for w0 in range(0, W, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)
        j_ok = j < W
        following = _tile(w_ptr, n, n_ok, W, j + BLOCK_W)  # in flight while this tile is computed on
        high = words >> 16  # codes 4-7 of each word, where the float trick reaches them
        dot = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
        unit = 1.0  # 16^-i
        for i in tl.static_range(4):
            x_lo = tl.load(x_ptr + row * K + 8 * j + i, mask=j_ok, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + row * K + 8 * j + i + 4, mask=j_ok, other=0.0).to(tl.float32)
            x_sum += x_lo + x_hi
            dot += (_as_float(words, 0xF << (4 * i)) - TWO_23) * (x_lo * unit)[None, :]
            dot += (_as_float(high, 0xF << (4 * i)) - TWO_23) * (x_hi * unit)[None, :]
            unit *= 0.0625
        # Per group: sum q x and sum x, then its scale and zero once (not once per word).
        dot = tl.sum(tl.reshape(dot, (BLOCK_N, BLOCK_G, WORDS_PER_GROUP)), axis=2)
        x_sum = tl.sum(tl.reshape(x_sum, (BLOCK_G, WORDS_PER_GROUP)), axis=1)
        g = w0 // WORDS_PER_GROUP + tl.arange(0, BLOCK_G)
        ok = n_ok[:, None] & (g < groups)[None, :]
        s = tl.load(s_ptr + n[:, None] * groups + g[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * groups + g[None, :], mask=ok, other=0).to(tl.int32)
        acc += s * (dot - (_as_float(z, 0xFF) - TWO_23) * x_sum[None, :])
        words = following
    tl.store(y_ptr + row * N + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, W, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    row = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
    words = _tile(w_ptr, n, n_ok, W, tl.arange(0, BLOCK_W))
    for w0 in range(0, W, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)
        j_ok = j < W
        following = _tile(w_ptr, n, n_ok, W, j + BLOCK_W)  # in flight while this tile is computed on
        biased = words ^ -0x7F7F7F80  # XOR 0x80 in every byte: q + 128, from 0 to 255
        high = biased >> 16
        unit = 1.0  # 256^-i
        for i in tl.static_range(2):
            x_lo = tl.load(x_ptr + row * K + 4 * j + i, mask=j_ok, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + row * K + 4 * j + i + 2, mask=j_ok, other=0.0).to(tl.float32)
            x_sum += x_lo + x_hi
            acc += (_as_float(biased, 0xFF << (8 * i)) - TWO_23) * (x_lo * unit)[None, :]
            acc += (_as_float(high, 0xFF << (8 * i)) - TWO_23) * (x_hi * unit)[None, :]
            unit *= 0.00390625
        words = following
    s = tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    y = (tl.sum(acc, axis=1) - 128.0 * tl.sum(x_sum, axis=0)) * s
    tl.store(y_ptr + row * N + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


# On a GPU the channels per program, the words per K tile and the warps are tuned once per weight shape (during the
# warm-up, before any CUDA-graph capture); Triton's CPU interpreter, which the tests use, cannot time kernels and
# takes one config.
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps)
           for n, w, warps in ((8, 128, 4), (8, 256, 4), (16, 64, 4), (16, 128, 4), (16, 256, 8), (32, 128, 8),
                               (32, 256, 8), (64, 128, 8))]
_int8_tuned = triton.autotune(configs=CONFIGS, key=["N", "K"])(_int8_kernel)
_int4_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "GROUP"])(_int4_kernel)
# Every config's tile holds whole groups up to this size (no pruning of configs: torch.compile failed on it).
MAX_GROUP = 8 * min(c.kwargs["BLOCK_W"] for c in CONFIGS)


def int4_matvec_takes(group_size: int) -> bool:
    return 8 <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0


def _launch(tuned, plain, x: torch.Tensor, N: int, M: int, *args, **plain_config) -> None:
    if x.is_cuda:
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args)
    else:
        plain[(triton.cdiv(N, plain_config["BLOCK_N"]), M)](*args, **plain_config)


def _words(q: torch.Tensor, codes_per_word: int) -> torch.Tensor:
    if q.shape[-1] % 4 or not q.is_contiguous():
        raise ValueError(f"the Triton matrix-vector kernels read 32-bit words: K must be a multiple of "
                         f"{codes_per_word} (got {q.shape[-1] * codes_per_word // 4})")
    return q.view(torch.int32)


def int8_matvec(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (a few rows), qweight int8 [N, K], scales [N] -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _launch(_int8_tuned, _int8_kernel, x, N, M, x.contiguous(), _words(qweight, 4), scales, y, N, K, K // 4,
            BLOCK_N=16, BLOCK_W=16)
    return y


def int4_matvec(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] (a few rows), qweight uint8 [N, K/2] (low nibble first), scales [N, G], zeros uint8 [N, G]."""
    M, K = x.shape
    N = qweight.shape[0]
    if not int4_matvec_takes(group_size):
        raise ValueError(f"the Triton INT4 matrix-vector kernel takes group sizes that are powers of two from 8 to "
                         f"{MAX_GROUP} (got {group_size})")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _launch(_int4_tuned, _int4_kernel, x, N, M, x.contiguous(), _words(qweight, 8), scales, zeros, y, N, K, K // 8,
            group_size, BLOCK_N=16, BLOCK_W=max(16, group_size // 8))
    return y
