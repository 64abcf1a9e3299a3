"""Linear layers with their weights prepacked for oneDNN, for decoding on a CPU (what vLLM's CPU build does).

PyTorch's default CPU GEMM is MKL's, and MKL picks slow code paths on AMD CPUs. On the 2-core AMD EPYC development
VM (2026-12-04, float32; `python -m engines.cpu_linear_bench`, engines/results/cpu/cpu_linear_bench.json), oneDNN
with the weight reordered once into its blocked layout beat `F.linear` on SmolLM2's served shapes by 1.2-1.6x at 32
rows (a 32-sequence decode step), 1.1-2.0x at 1 row and 1.2-1.3x at 128, and on the 49k-row LM head by 1.9-2.3x.
The reorder is done once, at start-up, into a copy: the model keeps its plain weights (other code may read or swap
them), so the packed layers hold their weights twice. Our engine packs its served layers (engines/ours/cpu_linear.py),
the speculative chapter the whole model (`pack_linears`): a pass of a few tokens costs about what one token's does
there, where with F.linear it cost 1.5-2x (speculative/verify_cost.py).
"""
from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN tunes the packed layout for; vLLM's CPU build uses 32 too. Any row count runs correctly.
PACK_FOR_ROWS = 32


def can_pack(linear: nn.Module) -> bool:
    """A plain float32/bfloat16 nn.Linear on the CPU, and a PyTorch built with oneDNN."""
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available())


class PackedLinear(nn.Module):
    """`linear`'s function, computed by oneDNN from a prepacked copy of its weight. `weight` and `bias` are still
    linear's own parameters (state_dict, parameters() and the shapes read from them are unchanged)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        # An opaque oneDNN tensor, not a parameter or buffer: nothing else may read or move it.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_FOR_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def packed(linear: nn.Module) -> nn.Module:
    """A PackedLinear for `linear` where oneDNN can run it, else `linear` itself."""
    return PackedLinear(linear) if can_pack(linear) else linear


def pack_linears(model: nn.Module) -> nn.Module:
    """Pack, in place, the seven projections of every decoder layer and the LM head of a core.model.Transformer
    (a tied LM head keeps sharing its weight with the embedding, which is only indexed). Returns the model."""
    for layer in model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, packed(getattr(parent, name)))
    model.lm_head = packed(model.lm_head)
    return model
