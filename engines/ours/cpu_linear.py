"""The served layers' projections with their weights prepacked for oneDNN (core/cpu_linear.py has the Linear).

PyTorch's default CPU GEMM is MKL's, and MKL picks slow code paths on AMD CPUs. On the 2-core AMD EPYC development
VM (2026-12-04, float32; `python -m engines.cpu_linear_bench`, engines/results/cpu/cpu_linear_bench.json), oneDNN
with the weight reordered once into its blocked layout beat `F.linear` on SmolLM2's served shapes by 1.2-1.6x at 32
rows (a 32-sequence decode step), 1.1-2.0x at 1 row and 1.2-1.3x at 128, and on the 49k-row LM head by 1.9-2.3x.
"""
from __future__ import annotations

from torch import nn

from core.cpu_linear import PACK_FOR_ROWS, PackedLinear, can_pack, packed  # noqa: F401  (the engine's names)


def pack_layers(model: nn.Module) -> None:
    """Pack, in place, the four projections of every layer of a serving copy (fused_projections.FusedTransformer):
    q|k|v, o, gate|up and down. The copy's attention and MLP modules are its own, so the caller's model keeps its
    plain Linear modules even where the copy shares them (o_proj, down_proj)."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj, attn.o_proj = packed(attn.qkv_proj), packed(attn.o_proj)
        mlp.gate_up_proj, mlp.down_proj = packed(mlp.gate_up_proj), packed(mlp.down_proj)
