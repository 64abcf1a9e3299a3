"""Quantized KV cache: keys and values stored as int8 (or int4, two per byte) with one float16 scale per token and
head (symmetric absmax over the head dimension), dequantized to the model's dtype when attention reads them.

Per-token scales suit a cache that grows a token at a time: a new token never changes the scales of old ones.
Round-to-nearest error per value is at most scale / 2 = absmax / (2 * qmax), qmax = 127 (int8) or 7 (int4).
"""
from __future__ import annotations

import torch

from core.kv_cache import KVCache


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes: int8 [..., D] or packed uint8 [..., D/2], float16 scales [..., 1])."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / qmax).clamp(min=1e-8).half()
    codes = (x.float() / scale.float()).round().clamp(-qmax, qmax).to(torch.int8)
    if bits == 4:  # two 4-bit codes per byte: low nibble = even index, high nibble = odd index (offset by 8)
        u = (codes + 8).to(torch.uint8)
        codes = u[..., 0::2] | (u[..., 1::2] << 4)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    if bits == 4:
        low, high = (codes & 0xF).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8
        codes = torch.stack([low, high], dim=-1).flatten(-2)
    return (codes.float() * scale.float()).to(dtype)


class QuantizedKVCache(KVCache):
    """Preallocated like StaticKVCache ([B, Hkv, max_len, D] per layer, written left to right), but in int8/int4."""

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 bits: int = 8, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, not {bits}")
        width = head_dim if bits == 8 else head_dim // 2
        code_dtype = torch.int8 if bits == 8 else torch.uint8
        shape = (batch_size, num_kv_heads, max_len)
        self.codes = [[torch.zeros(*shape, width, dtype=code_dtype, device=device) for _ in range(num_layers)]
                      for _ in "kv"]
        self.scales = [[torch.zeros(*shape, 1, dtype=torch.float16, device=device) for _ in range(num_layers)]
                       for _ in "kv"]
        self.key_pos = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.lengths = [0] * num_layers
        self.bits, self.dtype, self.max_len = bits, dtype, max_len

    def update(self, layer, k, v, positions):
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        out = []
        for i, x in enumerate((k, v)):
            codes, scale = quantize(x, self.bits)
            self.codes[i][layer][:, :, start:end] = codes
            self.scales[i][layer][:, :, start:end] = scale
            out.append(dequantize(self.codes[i][layer][:, :, :end], self.scales[i][layer][:, :, :end], self.bits,
                                  self.dtype))
        if layer == 0:
            self.key_pos[:, start:end] = positions
        self.lengths[layer] = end
        return out[0], out[1], self.key_pos[:, :end]

    def used_nbytes(self) -> int:
        """Bytes of the slots written so far (what a paged cache would hold)."""
        return self.nbytes() * self.lengths[0] // self.max_len

    def nbytes(self) -> int:
        """Bytes of the stored codes and scales (the whole preallocated buffer)."""
        tensors = [t for group in self.codes + self.scales for t in group]
        return sum(t.numel() * t.element_size() for t in tensors)
