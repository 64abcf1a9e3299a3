"""Packing 4-bit codes into bytes and int32 words, in the layouts our modules and vLLM's loaders read.

A 4-bit code is an integer 0..15. Three layouts:
- two per byte (our `Int4Linear`): codes [N, K] -> uint8 [N, K/2], even index in the low nibble;
- GPTQ (AutoGPTQ `qweight`): codes [K, N] -> int32 [K/8, N], packed along the input dim, code i of a word at bits
  4i..4i+3;
- AWQ (AutoAWQ GEMM `qweight`/`qzeros`): codes [K, N] -> int32 [K, N/8], packed along the output dim in the
  interleaved order AWQ_ORDER (bit slot i holds column AWQ_ORDER[i]), the order AutoAWQ's CUDA kernel wants.
A wrong layout does not crash anything downstream: it silently scrambles weights, so each has a round-trip test.
"""
from __future__ import annotations

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., K] (values 0..15, K even) -> uint8 [..., K/2], two codes per byte."""
    if codes.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _pack_words(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., 8] -> int32 [...]: code i at bits 4i..4i+3 (the top code may set the sign bit; that is fine)."""
    shifts = _SHIFTS.to(codes.device)
    return (codes.to(torch.int32) << shifts).sum(-1, dtype=torch.int32)


def _unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> codes uint8 [..., 8]."""
    shifts = _SHIFTS.to(words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def pack_gptq(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] -> int32 [K/8, N] (GPTQ qweight: packed along the input dim)."""
    K, N = codes.shape
    return _pack_words(codes.reshape(K // 8, 8, N).transpose(1, 2))


def unpack_gptq(words: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] -> codes uint8 [K, N]."""
    k8, N = words.shape
    return _unpack_words(words).transpose(1, 2).reshape(k8 * 8, N)


def pack_gptq_zeros(codes: torch.Tensor) -> torch.Tensor:
    """codes [G, N] -> int32 [G, N/8] (GPTQ qzeros: packed along the output dim, plain order)."""
    G, N = codes.shape
    return _pack_words(codes.reshape(G, N // 8, 8))


def unpack_gptq_zeros(words: torch.Tensor) -> torch.Tensor:
    G, n8 = words.shape
    return _unpack_words(words).reshape(G, n8 * 8)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """codes [R, N] -> int32 [R, N/8] in AWQ's interleaved order (qweight with R=K, qzeros with R=groups)."""
    R, N = codes.shape
    if N % 8:
        raise ValueError(f"AWQ packing needs the output size to be a multiple of 8, got {N}")
    grouped = codes.reshape(R, N // 8, 8)[..., AWQ_ORDER]
    return _pack_words(grouped)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> codes uint8 [R, N]."""
    R, n8 = words.shape
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))
    return _unpack_words(words)[..., inverse].reshape(R, n8 * 8)
