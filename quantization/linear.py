"""Weight-only quantized Linear modules that swap in for nn.Linear, and `quantize_model` that swaps them.

Both keep packed integer weights and dequantize on the fly: the float weight never exists in memory as a whole
except inside one matmul. Two backends compute the product:
- "dequant" (default, any device): unpack, apply scales and zeros in the activation dtype, F.linear. Portable and
  exact, but on a GPU it writes and re-reads a float copy of the weight, so it is slower than plain BF16 at batch 1.
- "torch": PyTorch's built-in weight-only kernels (`aten._weight_int8pack_mm`; `aten._weight_int4pack_mm`, the
  tinygemm kernel, on CUDA and its `_for_cpu` twin on CPU), which read the packed weight directly.
- "triton" (GPU): our Triton kernels, which read our own packed layout directly: INT8 matrix-vector (triton_gemv.py)
  for up to MATVEC_MAX_ROWS rows, dequant beyond; INT4 matrix-vector for one row, the tensor-core GEMM
  (triton_gemm.py) up to DEQUANT_MIN_ROWS rows, a one-pass Triton dequantization and cuBLAS beyond. A CPU takes
  the "dequant" path.
`set_backend(model, name)` switches every quantized module; gpu_bench.py compares them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from quantization.packing import pack_int4, unpack_int4
from quantization.rtn import dequantize_int4, quantize_int4, quantize_int8

BACKENDS = ("dequant", "torch", "triton")
# Projections of a decoder layer; embeddings and the LM head stay in float (as AutoAWQ and GPTQ checkpoints keep
# them) unless quantize_embeddings is called.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


MATVEC_MAX_ROWS = 8  # the "triton" backend's kernels read the weights once per row: beyond a few rows, dequantize


def use_matvec_kernel(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() // x.shape[-1] <= MATVEC_MAX_ROWS


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + b with q int8 [N, K] and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, "dequant"
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("split_counters", None, persistent=False)  # set_backend("triton") shares one buffer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, w.dtype, w.device)
        q, s = quantize_int8(w)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scales.to(x.dtype))
            y = y.reshape(*x.shape[:-1], -1)
        elif self.backend == "triton" and use_matvec_kernel(x):
            from quantization.triton_gemv import int8_matvec
            y = int8_matvec(x.reshape(-1, x.shape[-1]), self.qweight, self.scales, self.split_counters)
            y = y.reshape(*x.shape[:-1], -1)
        else:
            # Scaling the output instead of the weight: N multiplies per token rather than N*K.
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W[n, k] = (q[n, k] - z[n, g]) * s[n, g], g = k // group_size; q packed two per byte."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        gs = in_features if group_size <= 0 else group_size
        if in_features % gs or in_features % 2:
            raise ValueError(f"in_features {in_features} must be even and a multiple of group_size {gs}")
        self.in_features, self.out_features, self.group_size, self.backend = in_features, out_features, gs, "dequant"
        groups = in_features // gs
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("split_counters", None, persistent=False)  # set_backend("triton") shares one buffer
        self._kernel = None  # (packed weight, scales_and_zeros) in the torch kernel's layout, built on first use

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None = None, dtype=torch.float32) -> "Int4Linear":
        """codes uint8 [N, K] (0..15), scales [N, G], zeros [N, G] -> module (the form GPTQ and AWQ produce)."""
        N, K = codes.shape
        m = cls(K, N, K // scales.shape[1], bias is not None, dtype, codes.device)
        m.qweight.copy_(pack_int4(codes))
        m.scales.copy_(scales)
        m.zeros.copy_(zeros)
        if bias is not None:
            m.bias.copy_(bias)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False) -> "Int4Linear":
        w = linear.weight.detach()
        codes, scales, zeros = quantize_int4(w, group_size, symmetric)
        b = None if linear.bias is None else linear.bias.detach()
        return cls.from_codes(codes, scales, zeros, b, w.dtype)

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(self.codes(), self.scales, self.zeros).to(self.scales.dtype)

    def _kernel_weights(self, device: torch.device):
        """The tinygemm layout: w = (q - 8) * scale + offset, so offset = (8 - z) * s; scales_and_zeros [G, N, 2]."""
        if self._kernel is None or self._kernel[0].device != device:
            s = self.scales.float()
            sz = torch.stack((s, (8 - self.zeros.float()) * s), dim=-1).transpose(0, 1).contiguous()
            codes = self.codes()
            # The kernels tile K by 16 * inner_k_tiles: use the largest tile count the input size allows.
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            if device.type == "cuda":
                # The CUDA kernel takes uint8 [N, K/2] with the even index in the HIGH nibble (ours is low).
                hi_first = (codes[:, 0::2] << 4) | codes[:, 1::2]
                packed = torch.ops.aten._convert_weight_to_int4pack(hi_first.contiguous(), tiles)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), tiles)
            self._kernel = (packed, sz.to(torch.bfloat16))
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            packed, sz = self._kernel_weights(x.device)
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the kernels compute in bfloat16
            mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x2, packed, self.group_size, sz).to(x.dtype).reshape(*x.shape[:-1], -1)
        elif self.backend == "triton" and x.is_cuda:
            from quantization import triton_gemm
            from quantization.triton_gemm import DEQUANT_MIN_ROWS, int4_dequantize, int4_matmul
            from quantization.triton_gemv import int4_matvec, int4_matvec_takes
            x2 = x.reshape(-1, x.shape[-1])
            if len(x2) > DEQUANT_MIN_ROWS:  # compute-bound: cuBLAS on a BF16 copy of W, made in one pass
                w = int4_dequantize(self.qweight, self.scales, self.zeros, self.group_size, x.dtype)
                y = F.linear(x2, w)
            elif len(x2) == 1 and not triton_gemm.FACTORED_MAX_ROWS and int4_matvec_takes(self.group_size):
                from quantization import triton_gemv_half2
                matvec = triton_gemv_half2.int4_matvec_half2 if triton_gemv_half2.ENABLED else int4_matvec
                y = matvec(x2, self.qweight, self.scales, self.zeros, self.group_size, self.split_counters)
            else:
                # Past one row the GEMM wins: on an H100 it took 19-36 us at 8 rows where the matrix-vector kernel,
                # which reads the weights once per row, took 92-240 (quantization/results/h100/gemm_bench.json).
                y = int4_matmul(x2, self.qweight, self.scales, self.zeros, self.group_size)
            y = y.reshape(*x.shape[:-1], -1)
        else:
            codes = self.codes().to(x.dtype).view(self.out_features, -1, self.group_size)
            w = ((codes - self.zeros.to(x.dtype)[..., None]) * self.scales.to(x.dtype)[..., None]).flatten(1)
            y = F.linear(x, w)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def use_kernel_only(self) -> None:
        """Convert to the torch kernel's layout now and drop our own copy (halves nothing, avoids holding two)."""
        self.backend = "torch"
        self._kernel_weights(self.scales.device)
        self.qweight = torch.empty(0, dtype=torch.uint8, device=self.qweight.device)


class Int4Embedding(nn.Module):
    """An embedding table kept as INT4 rows in an Int4Linear's layout (row = token, group-wise along the hidden size):
    a lookup gathers the packed rows of the ids and dequantizes only those. With tied embeddings `table` is the LM
    head itself, so the one packed copy serves both; its own forward is never called from here. Rows come out in
    the table's scale dtype, exactly as `table.dequantized_weight()[ids]`."""

    def __init__(self, table: Int4Linear):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t, flat = self.table, ids.reshape(-1)
        rows = dequantize_int4(unpack_int4(t.qweight[flat]), t.scales[flat], t.zeros[flat])
        return rows.to(t.scales.dtype).view(*ids.shape, -1)


QUANTIZED = (Int8Linear, Int4Linear)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (e.g. 'layers.3.mlp.up_proj')."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_linear(linear: nn.Linear, method: str, group_size: int = 128, symmetric: bool = False) -> nn.Module:
    if method == "int8":
        return Int8Linear.from_linear(linear)
    if method == "int4":
        return Int4Linear.from_linear(linear, group_size, symmetric)
    raise ValueError(f"unknown method {method!r} (int8, int4)")


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 128, symmetric: bool = False) -> nn.Module:
    """Round-to-nearest: swap every projection of every decoder layer for its quantized module, in place."""
    for layer in model.layers:
        for name in LAYER_LINEARS:
            set_module(layer, name, quantize_linear(layer.get_submodule(name), method, group_size, symmetric))
    return model


HEAD_GROUP_SIZE = 32  # every logit reads the LM head: finer groups than the layers' (GPTQ g32 vs g64: README)


@torch.no_grad()
def quantize_embeddings(model: nn.Module, group_size: int = HEAD_GROUP_SIZE, symmetric: bool = False,
                        head_rounding=None) -> nn.Module:
    """INT4 for the LM head and the input embedding, in place; a tied pair stays one packed copy.

    Checkpoint formats (AutoAWQ, GPTQ) keep both in 16 bits, which caps a 4-bit model's weight saving: the tied
    49k x 576 table is half of SmolLM2 after AWQ. `head_rounding(weight) -> (codes, scales, zeros)` rounds the head
    (round-to-nearest if None; gptq.gptq_embeddings passes GPTQ); an untied input embedding, which feeds no matmul,
    is rounded to nearest."""
    tied = model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    dtype = model.embed_tokens.weight.dtype
    rounding = head_rounding or (lambda w: quantize_int4(w, group_size, symmetric))
    head = Int4Linear.from_codes(*rounding(model.lm_head.weight.detach()), dtype=dtype)
    table = head
    if not tied:
        table = Int4Linear.from_codes(*quantize_int4(model.embed_tokens.weight.detach(), group_size, symmetric),
                                      dtype=dtype)
    model.lm_head, model.embed_tokens = head, Int4Embedding(table)
    return model


def pick_group_size(model: nn.Module, requested: int) -> int:
    """`requested`, or with 0 ("auto") the largest of 128, 64, 32 that divides every projection's input size.

    SmolLM2's hidden size 576 is not a multiple of 128, so it gets 64; Llama shapes get 128.
    """
    sizes = {layer.get_submodule(n).in_features for layer in model.layers for n in LAYER_LINEARS}
    candidates = [requested] if requested > 0 else [128, 64, 32]
    for g in candidates:
        if all(k % g == 0 for k in sizes):
            return g
    raise UserError(f"group size {requested} does not divide the input sizes {sorted(sizes)}")


def set_backend(model: nn.Module, backend: str) -> None:
    """Switch every quantized module to `backend`. For "triton" on a GPU, also give them the matrix-vector kernels'
    split-K counters (triton_gemv.split_counters): one zeroed buffer for all, which each launch leaves zero."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} ({', '.join(BACKENDS)})")
    modules = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    counters = None
    if backend == "triton" and modules and modules[0].scales.is_cuda:
        from quantization.triton_gemv import split_counters
        counters = split_counters(MATVEC_MAX_ROWS, max(m.out_features for m in modules), modules[0].scales.device)
    for m in modules:
        m.backend, m.split_counters = backend, counters


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied embeddings), kernel copies included;
    not the split-K counters (scratch, not weights)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers() if not name.endswith("split_counters")]
    tensors += [t for m in model.modules() if isinstance(m, Int4Linear) and m._kernel for t in m._kernel]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
