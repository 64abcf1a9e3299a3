"""The elementwise work of a decoder layer as four Triton kernels: RMSNorm, residual add + RMSNorm, rotary
embedding of q and k, SiLU-and-multiply.

Run eagerly, a layer of core/model.py launches about 25 small PyTorch kernels besides its matmuls and attention:
RMSNorm alone is a cast, a square, a mean, an add, a reciprocal square root and two products, each a pass over the
hidden states, and the rotary embedding of q and k is ten more (a product, a half-swap with a negation and a
concatenation, another product, a sum, for each). A CUDA graph replays them without launch overhead, but each still
costs a few microseconds and a pass over memory. On the H100 at 256 decoding sequences of the Llama-2-7B shape
they took about 5 ms of a 27 ms step (engines README). torch.compile fuses them, and the engine compiles the layers
of 16-bit models; it cannot compile those of INT4 models (their CUDA-graph capture failed with the compiled layers),
so these kernels do the same fusion by hand: one kernel per norm, one for rope, one for the MLP's activation.

Each computes in float32 and rounds to the model's dtype exactly where the eager code rounds (after the residual
add, after normalising, after each product of the rope), so the results are eager's bit for bit apart from the
order of the RMSNorm sum and the `exp` of SiLU (an ulp, rarely). tests/test_engines_elementwise.py checks them
against core/model.py in Triton's CPU interpreter, and on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, sum_ptr, w_ptr, out_ptr, D, eps, HAS_DELTA: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0)
    if HAS_DELTA:  # the residual stream: x + delta, rounded to the model's dtype as eager's `x + attn(...)`
        delta = tl.load(delta_ptr + row * D + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * D + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    normed = (x32 * tl.rsqrt(tl.sum(x32 * x32, axis=0) / D + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * D + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)


@triton.jit
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, row_stride, HEADS, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    # One token per program: its q and k heads, which lie side by side at the start of its qkv row, in place.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    ok = h < HEADS
    first = qkv_ptr + t * row_stride + h * (2 * HALF) + d
    x1 = tl.load(first, mask=ok, other=0.0)
    x2 = tl.load(first + HALF, mask=ok, other=0.0)
    cos1 = tl.load(cos_ptr + t * 2 * HALF + d).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * 2 * HALF + HALF + d).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * 2 * HALF + d).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * 2 * HALF + HALF + d).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    dt = x1.dtype
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1), each product and the sum rounded as eager's
    out1 = ((a1 * cos1).to(dt).to(tl.float32) + (-a2 * sin1).to(dt).to(tl.float32)).to(dt)
    out2 = ((a2 * cos2).to(dt).to(tl.float32) + (a1 * sin2).to(dt).to(tl.float32)).to(dt)
    tl.store(first, out1, mask=ok)
    tl.store(first + HALF, out2, mask=ok)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(x_ptr + row * 2 * N + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * 2 * N + N + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu, rounded before the product as eager's
    tl.store(out_ptr + row * N + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)


# No fused multiply-add: the compiler would otherwise merge a product and the add after it into one FMA, skipping the
# rounding of the product that eager code does (seen in bfloat16 rope on an H100: 15% of values one ulp off).
EAGER_ROUNDING = dict(enable_fp_fusion=False)


def _warps(block: int) -> int:
    return max(1, min(8, block // 512))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """RMSNorm of x over its last dimension (core.model.RMSNorm), or with `delta` of (x + delta): then
    (x + delta, its RMSNorm), the residual add fused into the norm that follows it."""
    D = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else out
    block = triton.next_power_of_2(D)
    _rms_norm_kernel[(x.numel() // D,)](x, delta.contiguous() if delta is not None else x, total, weight, out, D,
                                        eps, HAS_DELTA=delta is not None, BLOCK=block, num_warps=_warps(block),
                                        **EAGER_ROUNDING)
    return out if delta is None else (total, out)


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, kv_heads: int,
             head_dim: int) -> None:
    """Rotate the q and k heads of `qkv` [..., (q_heads + 2 kv_heads) * head_dim] (a fused projection's output,
    contiguous) in place by positions' cos, sin [..., head_dim] (core.model.apply_rope)."""
    rows = qkv.numel() // qkv.shape[-1]
    heads = q_heads + kv_heads
    _rope_kernel[(rows,)](qkv, cos.contiguous(), sin.contiguous(), qkv.shape[-1], heads,
                          BLOCK_H=triton.next_power_of_2(heads), HALF=head_dim // 2, num_warps=4, **EAGER_ROUNDING)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2N] = gate | up (the fused gate|up projection's output) -> [..., N]."""
    N = gate_up.shape[-1] // 2
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(*gate_up.shape[:-1], N)
    block = 1024
    _silu_and_mul_kernel[(gate_up.numel() // (2 * N), triton.cdiv(N, block))](gate_up, out, N, BLOCK=block,
                                                                              num_warps=4, **EAGER_ROUNDING)
    return out


def supported(head_dim: int) -> bool:
    """The rope kernel splits head_dim in two halves of a power-of-two length (64 for Llama, 32 for SmolLM2)."""
    return head_dim % 2 == 0 and triton.next_power_of_2(head_dim // 2) == head_dim // 2
