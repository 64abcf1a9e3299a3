"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling them up before rounding.

For a Linear y = x W^T, scaling input channel k of W by s_k and dividing x_k by s_k computes the same function, but
weights with s_k > 1 lose less to rounding. AWQ picks s = x_mean^a / w_mean^(1-a) (x_mean: mean |activation| per
channel, w_mean: mean relative weight magnitude, AutoAWQ's "duo scaling"), grid-searching a in [0, 1) for the
smallest error of the block's output with fake-quantized weights. The 1/s is folded into the op that produces x (an
RMSNorm weight, or the rows of the previous Linear), so the scaled model costs nothing extra. Then a clipping
search shrinks each group's range where that lowers the output error, and the weights are rounded to nearest.
Per Llama decoder layer, as AutoAWQ does:
  input_layernorm -> q,k,v (error of the attention output)     v_proj -> o_proj (only without GQA)
  post_attention_layernorm -> gate,up (error of the MLP output)  up_proj -> down_proj

    python -m quantization.awq                                # default model, g64 asymmetric (zero point)
    python -m quantization.awq --output-dir /tmp/smollm2-awq    # + AutoAWQ-format checkpoint vLLM loads
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import cli
from quantization.gptq import add_calibration_args, run_method
from quantization.layerwise import LayerInputs, quantize_layer_by_layer
from quantization.linear import LAYER_LINEARS, Int4Linear, set_module
from quantization.rtn import fake_quantize_int4, grouped, quantize_int4

CLIP_SKIP = ("self_attn.q_proj", "self_attn.k_proj")  # their error is squashed by softmax: AutoAWQ skips them too


@torch.no_grad()
def search_scales(linears: list[nn.Linear], x: torch.Tensor, block: Callable[[torch.Tensor], torch.Tensor],
                  group_size: int, symmetric: bool, n_grid: int = 20) -> torch.Tensor:
    """Best per-input-channel scales s [K] for `linears` (all fed x [S, T, K]); block(x) is the output judged."""
    target = block(x)
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    weight = torch.cat([lin.weight for lin in linears]).float()
    w_rel = grouped(weight.abs(), group_size)
    w_mean = (w_rel / w_rel.amax(-1, keepdim=True).clamp(min=1e-8)).flatten(1).mean(0)
    originals = [lin.weight.detach().clone() for lin in linears]
    best, best_err = torch.ones_like(x_mean), float("inf")
    try:
        for i in range(n_grid):
            a = i / n_grid
            s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.copy_((fake_quantize_int4(w.float() * s, group_size, symmetric) / s).to(w.dtype))
            err = F.mse_loss(block(x).float(), target.float()).item()
            if err < best_err:
                best, best_err = s, err
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide prev's outputs by s and multiply the linears' inputs by s: the function is unchanged."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # RMSNorm: output = weight * normalised(x)
        prev.weight.div_(s.to(prev.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None])


@torch.no_grad()
def scale_layer(layer: nn.Module, inputs: LayerInputs, group_size: int, symmetric: bool = False,
                n_grid: int = 20, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Search and fold AWQ scales into one decoder layer (weights stay float). Returns the scales found."""
    attn, mlp = layer.self_attn, layer.mlp
    x, found = inputs.hidden, {}

    def batched(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: torch.cat([fn(b) for b in t.split(batch_size)])

    attn_out = batched(lambda b: attn(b, inputs.cos, inputs.sin, inputs.positions, None))
    normed = batched(layer.input_layernorm)(x)
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    found["qkv"] = s = search_scales(qkv, normed, attn_out, group_size, symmetric, n_grid)
    fold_scales(layer.input_layernorm, qkv, s)
    normed = normed / s.to(normed.dtype)  # what the folded norm now produces

    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # o_proj's inputs are v_proj's outputs only without GQA
        o_in = []
        hook = attn.o_proj.register_forward_hook(lambda _m, args, _o: o_in.append(args[0]))
        attn_out(normed)
        hook.remove()
        found["o"] = s = search_scales([attn.o_proj], torch.cat(o_in), attn.o_proj, group_size, symmetric, n_grid)
        fold_scales(attn.v_proj, [attn.o_proj], s)

    h = x + attn_out(normed)
    normed = batched(layer.post_attention_layernorm)(h)
    del h
    gate_up = [mlp.gate_proj, mlp.up_proj]
    found["gate_up"] = s = search_scales(gate_up, normed, batched(mlp), group_size, symmetric, n_grid)
    fold_scales(layer.post_attention_layernorm, gate_up, s)
    normed = normed / s.to(normed.dtype)

    act = batched(lambda b: F.silu(mlp.gate_proj(b)) * mlp.up_proj(b))(normed)
    found["down"] = s = search_scales([mlp.down_proj], act, mlp.down_proj, group_size, symmetric, n_grid)
    fold_scales(mlp.up_proj, [mlp.down_proj], s)
    return found


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int, symmetric: bool, n_grid: int = 20,
                max_shrink: float = 0.5, rows_per_batch: int = 0) -> torch.Tensor:
    """Per-group clipping thresholds [N, G] for w [N, K] that minimise the error of each group's partial output.

    x [tokens, K] is a sample of the Linear's inputs. Shrinks max|w| of each group by up to `max_shrink`. Rows are
    independent; they go `rows_per_batch` at a time (0: about 16M weights a batch, few launches on a big GPU layer).
    """
    N, K = w.shape
    rows_per_batch = rows_per_batch or max(1, (1 << 24) // K)
    xg = grouped(x.float(), group_size)  # [tokens, G, gs]
    best_max = []
    for r in range(0, N, rows_per_batch):
        wg = grouped(w[r:r + rows_per_batch].float(), group_size)  # [n, G, gs]
        target = torch.einsum("tgk,ngk->ntg", xg, wg)
        org_max = wg.abs().amax(-1)  # [n, G]
        best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            m = org_max * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(wg, m[..., None]), -m[..., None])
            q = grouped(fake_quantize_int4(clipped.flatten(1), group_size, symmetric), group_size)
            err = (torch.einsum("tgk,ngk->ntg", xg, q) - target).pow(2).mean(1)  # [n, G]
            better = err < best_err
            best_err[better], best[better] = err[better], m[better]
        best_max.append(best)
    return torch.cat(best_max)


def linear_input_samples(layer: nn.Module, inputs: LayerInputs, names: list[str], max_tokens: int,
                         batch_size: int) -> dict[str, torch.Tensor]:
    """Up to `max_tokens` input rows [tokens, K] of each named Linear, evenly spaced over the calibration set."""
    from quantization.layerwise import observe_inputs

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    observe_inputs(layer, names, inputs, lambda n, t: seen[n].append(t), batch_size)
    out = {}
    for n, parts in seen.items():
        allx = torch.cat(parts)
        step = max(len(allx) // max_tokens, 1)
        out[n] = allx[::step][:max_tokens]
    return out


@torch.no_grad()
def awq_layer(layer: nn.Module, inputs: LayerInputs, group_size: int = 128, symmetric: bool = False,
              n_grid: int = 20, clip: bool = True, clip_tokens: int = 512, batch_size: int = 8) -> None:
    """Scale, clip and round every projection of one decoder layer, swapping them for Int4Linear."""
    scale_layer(layer, inputs, group_size, symmetric, n_grid, batch_size)
    names = [n for n in LAYER_LINEARS if n not in CLIP_SKIP] if clip else []
    samples = linear_input_samples(layer, inputs, names, clip_tokens, batch_size) if names else {}
    for name in LAYER_LINEARS:
        lin = layer.get_submodule(name)
        w = lin.weight.detach()
        if name in samples:
            m = search_clip(w, samples.pop(name), group_size, symmetric, n_grid)[..., None]
            w = torch.maximum(torch.minimum(grouped(w.float(), group_size), m), -m).flatten(1)
        codes, scales, zeros = quantize_int4(w, group_size, symmetric)
        bias = None if lin.bias is None else lin.bias.detach()
        set_module(layer, name, Int4Linear.from_codes(codes, scales, zeros, bias, lin.weight.dtype))


def awq_model(model: nn.Module, ids: torch.Tensor, group_size: int = 128, symmetric: bool = False,
              n_grid: int = 20, clip: bool = True, batch_size: int = 8, search_samples: int = 0) -> nn.Module:
    """AWQ the whole model from calibration ids [S, T], one decoder layer at a time.

    search_samples > 0 runs the grid searches on the first that many samples only (each grid point is a forward
    of the block: on a CPU that is most of the time); all samples still flow through the layers.
    """
    def quantize(layer: nn.Module, inp: LayerInputs) -> None:
        sub = inp if search_samples <= 0 else LayerInputs(inp.hidden[:search_samples], inp.cos, inp.sin,
                                                          inp.positions)
        awq_layer(layer, sub, group_size, symmetric, n_grid, clip, batch_size=batch_size)

    quantize_layer_by_layer(model, ids, quantize, "AWQ", batch_size)
    return model


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.awq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_args(parser)
    parser.add_argument("--n-grid", type=int, default=20, help="grid points of the scale and clipping searches")
    parser.add_argument("--no-clip", action="store_true", help="skip the clipping search")
    parser.add_argument("--search-samples", type=int, default=8,
                        help="calibration samples the grid searches use (0: all; 8 keeps the CPU default quick)")
    args = parser.parse_args(argv)
    run_method(args, "AWQ", lambda model, ids, gs: awq_model(
        model, ids, gs, args.symmetric, args.n_grid, not args.no_clip, args.batch_size, args.search_samples))


if __name__ == "__main__":
    main()
