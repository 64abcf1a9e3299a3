"""Round-to-nearest (RTN) weight quantization: the baseline GPTQ and AWQ improve on.

INT8 is symmetric per output channel: w ~ q * s, q in -127..127, one scale per row.
INT4 is group-wise along the input dim: each run of `group_size` weights in a row shares a scale and an integer zero
point, w ~ (q - z) * s with q in 0..15. Symmetric fixes z = 8 and s = max|w| / 7 (zero maps exactly to zero);
asymmetric spends the full 0..15 range on [min, max] of the group.
Shapes: a weight is [N, K] (out, in) as nn.Linear stores it; scales and zeros are [N, K / group_size].
"""
from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scales float32 [N]) with w ~ q * scales[:, None]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def int4_params(w: torch.Tensor, group_size: int, symmetric: bool, shrink: float | torch.Tensor = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of each group of w [N, K] -> (scales float32 [N, G], zeros uint8 [N, G]).

    shrink < 1 narrows each group's range [min, max] to shrink * [min, max]: the extremes are clipped, the rest
    gets a finer grid (a number, or a tensor [N, G] per group)."""
    g = grouped(w.float(), group_size)
    if symmetric:
        scales = (g.abs().amax(-1) * shrink).clamp(min=1e-8) / 7
        zeros = torch.full_like(scales, 8)
    else:
        lo, hi = g.amin(-1).clamp(max=0) * shrink, g.amax(-1).clamp(min=0) * shrink  # keep 0 representable
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, 15)
    return scales, zeros.to(torch.uint8)


def int4_params_mse(w: torch.Tensor, group_size: int, symmetric: bool, grid: int = 100, max_shrink: float = 0.8,
                    norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_params with each group's range shrunk by the factor in 1, 0.99, ... 0.21 that minimises the group's
    sum |w - dequantized w|^norm: the `mse` option of the GPTQ authors' code (llm-compressor's "mse" observer).
    Min-max wastes levels on a group's few largest weights; clipping them usually loses less than it gains."""
    g = grouped(w.float(), group_size)
    best_err = torch.full(g.shape[:2], float("inf"), device=w.device)
    best_shrink = torch.ones_like(best_err)
    for i in range(int(max_shrink * grid)):
        shrink = 1 - i / grid
        scales, zeros = int4_params(w, group_size, symmetric, shrink)
        s, z = scales[..., None], zeros[..., None].float()
        err = (((torch.round(g / s) + z).clamp(0, 15) - z) * s - g).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_shrink = torch.where(better, shrink, best_shrink)
    return int4_params(w, group_size, symmetric, best_shrink)


def quantize_int4_with(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] of w [N, K] for given group scales and zeros [N, G]."""
    g = grouped(w.float(), w.shape[1] // scales.shape[1])
    q = torch.round(g / scales[..., None]) + zeros[..., None].float()
    return q.clamp(0, 15).to(torch.uint8).flatten(1)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes uint8 [N, K] in 0..15, scales float32 [N, G], zeros uint8 [N, G])."""
    scales, zeros = int4_params(w, group_size, symmetric)
    return quantize_int4_with(w, scales, zeros), scales, zeros


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(codes [N, K], scales, zeros [N, G]) -> float32 [N, K]."""
    g = grouped(codes.float(), codes.shape[1] // scales.shape[1])
    return ((g - zeros[..., None].float()) * scales[..., None].float()).flatten(1)


def fake_quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> torch.Tensor:
    """Quantize and dequantize in one step: what the model computes with, in w's dtype."""
    return dequantize_int4(*quantize_int4(w, group_size, symmetric)).to(w.dtype)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, K / group_size, group_size]; group_size <= 0 means one group per row."""
    N, K = w.shape
    gs = K if group_size <= 0 else group_size
    if K % gs:
        raise ValueError(f"input size {K} is not a multiple of the group size {gs}")
    return w.reshape(N, K // gs, gs)
