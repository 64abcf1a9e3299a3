"""An INT4 matrix-vector kernel that multiplies in pairs of float16 (f16x2): a third fewer instructions per weight.

triton_gemv.py's INT4 kernel spends about 4 instructions per weight (`python -m quantization.kernel_sass`), most of
them float32 FMAs and the bit operations that make a code a float: at one row and 3 TB/s that is most of what an H100
can issue, so on large matrices it is bound by instructions, not by memory. Hopper (like every GPU since Pascal)
also computes on two float16 values packed in one register, one instruction for both. This kernel does:

- per word of 8 codes (code i at bits 4i): one shift and four LOP3s make four f16x2 registers holding the pairs of
  codes (0, 4), (1, 5), (2, 6), (3, 7) as 1024 + c (or 1024 + 16c), since OR-ing a code into the bits of 1024.0
  (0x6400) gives exactly that float16; one HADD2 or HFMA2 each takes them to c; one HMUL2 and three HFMA2s multiply
  them by the matching pairs of x and sum; one add and one conversion give the word's float32 sum: 16
  instructions per 8 weights where the float32 kernel needs about 30. With the loads, the group arithmetic and the
  loop, `python -m quantization.kernel_sass` counts 2.8-3.1 instructions per weight (triton_gemv.py's: 4.0-4.7).
- x comes prepared, once per projection input (`pairs_of`): scaled per group by a power of two (so that no f16 sum
  can overflow: 8 products of codes up to 15 by |x| < 512 stay below float16's 65504, and small values keep 11 bits),
  rounded to float16 and laid out as the four planes of pairs the kernel reads, followed by each group's inverse scale
  and its sum of x (for the zero points: y = sum_g s (sum q x - z sum x), as in triton_gemv.py).
- precision: each product and sum rounds to float16 (11 bits), per word; the words are summed in float32. Expected
  against the float32 reference: about 1e-3 relative, the order of bfloat16's own rounding (tinygemm: 1.7e-3); the
  interpreter, which rounds only x to float16, measures 5e-4.

The f16x2 arithmetic is inline PTX, which Triton's CPU interpreter cannot run; there the same kernel computes each
word's sum with float32 operations on the same float16 inputs, so the tests check the layout, the scaling and the
group arithmetic, and a GPU test checks the PTX. Split-K, the counters and PDL are triton_gemv.py's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantization import triton_gemv
from quantization.triton_gemv import (CONFIGS, _after_previous_kernel, _channels, _launch, _scales_and_zeros, _store,
                                      _tile, _words, _words_of, check_group_size)

# One word: sum over its 8 codes of c x, from the f16x2 pairs p_i = (x[8j + i], x[8j + i + 4]) (low, high half).
_DOT8 = tl.constexpr("""
{
.reg .b32 a, b, c, d, t, acc, k1024, k16, km64;
.reg .f16 lo, hi;
mov.b32 k1024, 0x64006400;
mov.b32 k16, 0x2C002C00;
mov.b32 km64, 0xD400D400;
lop3.b32 a, $1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b, $1, 0x00F000F0, 0x64006400, 0xEA;
shr.u32 t, $1, 8;
lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 a, a, k1024;
fma.rn.f16x2 b, b, k16, km64;
sub.f16x2 c, c, k1024;
fma.rn.f16x2 d, d, k16, km64;
mul.rn.f16x2 acc, a, $2;
fma.rn.f16x2 acc, b, $3, acc;
fma.rn.f16x2 acc, c, $4, acc;
fma.rn.f16x2 acc, d, $5, acc;
mov.b32 {lo, hi}, acc;
add.rn.f16 lo, lo, hi;
cvt.f32.f16 $0, lo;
}
""")
# (lop3 0xEA: (a & b) | c. 0x6400 is 1024.0 in float16, 0x2C00 1/16, 0xD400 -64: (1024 + 16c) / 16 - 64 = c.)


@triton.jit
def _half(pair, high: tl.constexpr):
    """One float16 of an f16x2 word, as float32 (the interpreter's stand-in for the PTX's packed arithmetic)."""
    bits = (pair >> 16) & 0xFFFF if high else pair & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _codes(word, bit: tl.constexpr):
    return ((word >> bit) & 0xF).to(tl.float32)


@triton.jit
def _word_dot(word, p0, p1, p2, p3, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(_DOT8, "=r,r,r,r,r,r", [word, p0, p1, p2, p3], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        dot = _codes(word, 0) * _half(p0, False) + _codes(word, 16) * _half(p0, True)
        dot += _codes(word, 4) * _half(p1, False) + _codes(word, 20) * _half(p1, True)
        dot += _codes(word, 8) * _half(p2, False) + _codes(word, 24) * _half(p2, True)
        dot += _codes(word, 12) * _half(p3, False) + _codes(word, 28) * _half(p3, True)
        return dot


@triton.jit
def _int4_half2_kernel(xp_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr, N, K, W, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                       ASM: tl.constexpr):
    WORDS_PER_GROUP: tl.constexpr = GROUP // 8
    BLOCK_G: tl.constexpr = BLOCK_W // WORDS_PER_GROUP  # whole groups per tile
    row, n, n_ok = _channels(N, BLOCK_N)
    groups = K // GROUP
    start, end = _words_of(W, BLOCK_W, SPLIT)
    xp = xp_ptr + row * (4 * W + 2 * groups)  # this row's pairs_of: 4 planes of W pairs, inverse scales, sums
    group_ptr = (xp + 4 * W).to(tl.pointer_type(tl.float32))
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    words = _tile(w_ptr, n, n_ok, W, start + tl.arange(0, BLOCK_W), end)
    _after_previous_kernel(PDL)
    for w0 in range(start, end, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)
        j_ok = j < end
        following = _tile(w_ptr, n, n_ok, W, j + BLOCK_W, end)  # in flight while this tile is computed on
        p0 = tl.load(xp + j, mask=j_ok, other=0)
        p1 = tl.load(xp + W + j, mask=j_ok, other=0)
        p2 = tl.load(xp + 2 * W + j, mask=j_ok, other=0)
        p3 = tl.load(xp + 3 * W + j, mask=j_ok, other=0)
        dot = _word_dot(words, p0[None, :], p1[None, :], p2[None, :], p3[None, :], ASM)
        dot = tl.sum(tl.reshape(dot, (BLOCK_N, BLOCK_G, WORDS_PER_GROUP)), axis=2)
        g = w0 // WORDS_PER_GROUP + tl.arange(0, BLOCK_G)
        inverse = tl.load(group_ptr + g, mask=g < groups, other=0.0)
        x_sum = tl.load(group_ptr + groups + g, mask=g < groups, other=0.0)
        s, z = _scales_and_zeros(s_ptr, z_ptr, n, n_ok, g, groups)
        acc += s * (dot * inverse[None, :] - z * x_sum[None, :])
        words = following
    _store(y_ptr, part_ptr, count_ptr, tl.sum(acc, axis=1), n, n_ok, N, SPLIT)


_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "GROUP"])(_int4_half2_kernel)


def tuned_configs() -> dict[str, str]:
    """As triton_gemv.tuned_configs, for this kernel."""
    return {f"int4 half2 {key}": str(config) for key, config in _tuned.cache.items()}


def pairs_of(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] -> int32 [M, 4 K/8 + 2 K/group]: per row, plane i holds the f16x2 pairs (x[8j + i], x[8j + i + 4]) of
    each word j, x scaled per group by the power of two that brings its largest |x| into [256, 512); then each
    group's inverse scale and its sum of x (float32 bits)."""
    M, K = x.shape
    xf = x.float().view(M, K // group_size, group_size)
    exponent = torch.frexp(xf.abs().amax(-1))[1]  # largest |x| = m 2^exponent, m in [0.5, 1) (0 for a zero group)
    scale = torch.ldexp(torch.ones_like(xf[..., 0]), 9 - exponent.clamp(min=-100))  # (a finite scale for tiny x)
    x16 = (xf * scale[..., None]).to(torch.float16).view(M, K // 8, 2, 4)  # word j: x[8j..8j+3], x[8j+4..8j+7]
    # Pair (x[8j + i], x[8j + i + 4]) as one int32, built with shifts: Inductor (torch 2.11) cannot lower a view from
    # float16 to int32 of the strided tensors it picks, while a view to int16 (same size) is always allowed.
    bits = x16.view(torch.int16).to(torch.int32)
    planes = ((bits[:, :, 1] << 16) | (bits[:, :, 0] & 0xFFFF)).transpose(1, 2)  # [M, 4, K/8]
    groups = torch.cat([1.0 / scale, xf.sum(-1)], dim=-1).view(torch.int32)
    return torch.cat([planes.reshape(M, -1), groups], dim=-1)


# Off by default; gpu_bench's "half2" configs turn it on (Int4Linear's "triton" backend, one row). On an H100 it made
# the Llama-2-70B decode 69% of copy bandwidth but the 7B's slower than the float32 kernel (2.87 against 2.72 ms).
ENABLED = False


def int4_matvec_half2(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, counters: torch.Tensor | None = None, config: dict | None = None,
                      pairs: torch.Tensor | None = None) -> torch.Tensor:
    """triton_gemv.int4_matvec's contract (x [M, K], qweight uint8 [N, K/2], scales [N, G], zeros uint8 [N, G]), and
    its launch (triton_gemv.use_pdl); pairs: pairs_of(x, group_size) if already made. pairs_of runs outside the
    custom op, so that torch.compile can fuse it into the kernel that produced x."""
    check_group_size(group_size)
    pairs = pairs_of(x, group_size) if pairs is None else pairs
    if triton_gemv.AS_OP and x.is_cuda and config is None:
        return torch.ops.llmip.int4_matvec_half2_op(x, pairs, qweight, scales, zeros, group_size, counters,
                                                    triton_gemv.PDL)
    return _int4_matvec_half2(x, pairs, qweight, scales, zeros, group_size, counters, config)


def _int4_matvec_half2(x, pairs, qweight, scales, zeros, group_size, counters, config, pdl=False):
    M, K = x.shape
    y = torch.empty(M, qweight.shape[0], dtype=x.dtype, device=x.device)
    _launch(_tuned, _int4_half2_kernel, y, counters, config, (pairs, _words(qweight, 8), scales, zeros),
            (y.shape[1], K, K // 8, group_size), {"BLOCK_N": 16, "BLOCK_W": max(16, group_size // 8), "SPLIT": 1},
            pdl, ASM=x.is_cuda)
    return y


@torch.library.custom_op("llmip::int4_matvec_half2_op", mutates_args=())  # as triton_gemv's ops (x: its shape)
def _int4_matvec_half2_op(x: torch.Tensor, pairs: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor, group_size: int, counters: torch.Tensor | None,
                          pdl: bool) -> torch.Tensor:
    return _int4_matvec_half2(x, pairs, qweight, scales, zeros, group_size, counters, None, pdl)


@_int4_matvec_half2_op.register_fake
def _(x, pairs, qweight, scales, zeros, group_size, counters, pdl):
    return x.new_empty(x.shape[0], qweight.shape[0])
