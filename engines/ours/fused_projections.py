"""Fused projections: q|k|v as one matmul and gate|up as another, as vLLM's QKVParallelLinear and
MergedColumnParallelLinear do.

The three attention projections read the same input, and so do the MLP's gate and up: stacking their weights along
the output dimension turns five matmuls per layer into two. That is fewer kernel launches per step, and one larger
GEMM, which at batch 1 on a GPU (a GEMV that only streams the weights) gets closer to the memory bandwidth than three
small ones. vLLM goes further and loads the checkpoint's q/k/v tensors straight into the stacked parameter; here the
model is already loaded, so the stacked weight is built once and the model's own q/k/v and gate/up weights become
views of it (no weight is held twice).

The fused layers live in a serving copy of the model (`FusedTransformer`), which shares every other module with it:
the model the caller gave keeps its `q_proj`, `k_proj`, ... modules, so a chapter that hooks or swaps them later
(GPTQ's Hessians, quantization, tensor parallelism) still sees them.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from core.model import MLP, Attention, DecoderLayer, Transformer
from quantization.linear import QUANTIZED


def stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along dim 0; a view, not a copy, when they already lie back to back in one storage
    (a model served before: its weights are views of the stack), so serving a model twice holds it once."""
    first, offset = tensors[0], tensors[0].storage_offset()
    for t in tensors:
        same_storage = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (same_storage and t.is_contiguous() and t.storage_offset() == offset):
            return torch.cat(tensors)
        offset += t.numel()
    return first.as_strided((sum(len(t) for t in tensors), *first.shape[1:]), first.stride())


def stack_linears(parts: list[nn.Module]) -> nn.Module:
    """One projection whose output is the parts' outputs side by side: an nn.Linear, or a weight-only quantized
    Linear (quantization.linear), every tensor of which has one row per output channel (codes, scales, zeros, bias),
    so stacking rows stacks the projections. Each part's tensors become views of its rows of the stacked ones, so
    the old separate tensors are freed."""
    first = parts[0]
    fused = copy.copy(first)  # the same class and settings (group size, backend); its tensors are replaced below
    fused._parameters, fused._buffers = dict(first._parameters), dict(first._buffers)
    fused.out_features = sum(p.out_features for p in parts)
    for name, tensor in [*first._parameters.items(), *first._buffers.items()]:
        if tensor is None:
            continue
        stacked = stack_rows([getattr(p, name).detach() for p in parts])
        if name in first._parameters:
            fused._parameters[name] = nn.Parameter(stacked, requires_grad=tensor.requires_grad)
        else:
            fused._buffers[name] = stacked
        start = 0
        for p in parts:
            rows = stacked[start:start + p.out_features]
            if name in p._parameters:
                p._parameters[name].data = rows
            else:
                p._buffers[name] = rows
            start += p.out_features
    for m in (fused, *parts):
        if hasattr(m, "_kernel"):  # Int4Linear's cached tinygemm layout: of the old rows; rebuilt on first use
            m._kernel = None
    return fused


class FusedAttention(Attention):
    """core.model.Attention with q|k|v in one Linear (`qkv_proj`); o_proj is the original module."""
    triton_elementwise = False  # FusedTransformer.use_triton_elementwise switches it on

    def __init__(self, attn: Attention):
        nn.Module.__init__(self)
        self.layer_idx, self.head_dim = attn.layer_idx, attn.head_dim
        # From the projections, not the config: under tensor parallelism they hold this rank's heads only.
        self.qkv_sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv_proj = stack_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)  # the rest is core.model.Attention.forward

    def forward(self, x, cos, sin, positions, cache) -> torch.Tensor:
        if not self.triton_elementwise or cache is None:
            return super().forward(x, cos, sin, positions, cache)
        from engines.ours.triton_elementwise import rope_qk_  # imported where it runs: CPUs may lack a Triton build

        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        q_heads, kv_heads = self.qkv_sizes[0] // self.head_dim, self.qkv_sizes[1] // self.head_dim
        rope_qk_(qkv, cos, sin, q_heads, kv_heads, self.head_dim)  # one kernel, not ten
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in qkv.split(self.qkv_sizes, dim=-1))
        out = cache.attend(self.layer_idx, q, k, v, positions)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FusedMLP(MLP):
    """SwiGLU with gate|up in one Linear (`gate_up_proj`); down_proj is the original module."""
    triton_elementwise = False

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.gate_up_sizes = [mlp.gate_proj.out_features, mlp.up_proj.out_features]
        self.gate_up_proj = stack_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x):
        if self.triton_elementwise:
            from engines.ours.triton_elementwise import silu_and_mul
            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class FusedDecoderLayer(DecoderLayer):
    """The layer's own norms, with fused attention and MLP; DecoderLayer.forward as it is, or with the residual add
    fused into the second norm."""
    triton_elementwise = False

    def __init__(self, layer: DecoderLayer):
        nn.Module.__init__(self)
        self.input_layernorm = layer.input_layernorm
        self.self_attn = FusedAttention(layer.self_attn)
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = FusedMLP(layer.mlp)

    def forward(self, x, cos, sin, positions, cache):
        if not self.triton_elementwise:
            return super().forward(x, cos, sin, positions, cache)
        from engines.ours.triton_elementwise import rms_norm

        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = rms_norm(x, norm1.weight, norm1.eps)
        attn = self.self_attn(h, cos, sin, positions, cache)
        x, h = rms_norm(x, norm2.weight, norm2.eps, delta=attn)  # x + attn, and its norm
        return x + self.mlp(h)


class FusedTransformer(Transformer):
    """A serving copy of `model`: its embedding, final norm and LM head, and fused layers over its weights."""

    def __init__(self, model: Transformer):
        nn.Module.__init__(self)
        self.config, self.inv_freq = model.config, model.inv_freq
        self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleList(FusedDecoderLayer(layer) for layer in model.layers)
        self.norm, self.lm_head = model.norm, model.lm_head
        self.train(model.training)

    def use_triton_elementwise(self) -> None:
        """Norms, rope and the MLP's activation through triton_elementwise.py's fused kernels (CUDA, uncompiled
        layers: what torch.compile would fuse). The head dimension must split for the rope kernel."""
        from engines.ours import triton_elementwise

        if not triton_elementwise.supported(self.config.head_dim):
            return
        for layer in self.layers:
            layer.triton_elementwise = layer.self_attn.triton_elementwise = layer.mlp.triton_elementwise = True


def stackable(parts: list[nn.Module]) -> bool:
    """Projections of one input that stack_linears can merge: all plain nn.Linear, or all quantized the same way
    (class, group size, scale dtype, backend) with their own packed codes (not tinygemm's layout alone)."""
    first = parts[0]
    if any(type(p) is not type(first) or (p.bias is None) != (first.bias is None) for p in parts):
        return False
    if type(first) is nn.Linear:
        return True
    if not isinstance(first, QUANTIZED):
        return False
    return all(p.qweight.numel() and p.scales.dtype == first.scales.dtype and p.backend == first.backend
               and getattr(p, "group_size", None) == getattr(first, "group_size", None) for p in parts)


def can_fuse(layer: nn.Module) -> bool:
    """Exactly core's layer, with stackable q/k/v and gate/up: a subclass may have changed forward."""
    if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention or type(layer.mlp) is not MLP:
        return False
    a, m = layer.self_attn, layer.mlp
    return stackable([a.q_proj, a.k_proj, a.v_proj]) and stackable([m.gate_proj, m.up_proj])


def fuse_projections(model: Transformer) -> Transformer:
    """The model to serve: a FusedTransformer over `model` if every layer can be fused, else `model` itself.

    `model` computes what it did (its q/k/v and gate/up weights become views of the stacked ones); the copy
    computes the same function with two matmuls per layer where it had five."""
    if type(model) is not Transformer or not all(can_fuse(layer) for layer in model.layers):
        return model
    return FusedTransformer(model)
