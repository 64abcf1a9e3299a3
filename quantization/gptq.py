"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

For a Linear with calibration inputs X [tokens, K], the loss ||X W^T - X Q^T||^2 has Hessian H = 2 X^T X (shared by
every output row). Damping (a fraction of mean(diag H) on the diagonal) keeps it invertible; the upper Cholesky factor
of H^-1 gives the update coefficients; updates are applied lazily, a block of columns at a time, so most of the work
is one matmul per block. act_order quantizes columns of large diag(H) (busy inputs) first; group parameters then
come from the unmodified weights ("static groups"), so groups stay contiguous and the checkpoint format is unchanged.

    python -m quantization.gptq                               # default model, g64 (576 is not a multiple of 128)
    python -m quantization.gptq --group-size 128 --act-order --output-dir /tmp/smollm2-gptq
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from core.__main__ import add_model_args
from core.errors import cli
from quantization.layerwise import LayerInputs, calibration_ids, observe_inputs, quantize_layer_by_layer
from quantization.linear import HEAD_GROUP_SIZE, LAYER_LINEARS, Int4Linear, quantize_embeddings, set_module
from quantization.rtn import int4_params, int4_params_mse

OBSERVERS = {"minmax": int4_params, "mse": int4_params_mse}  # how a group's scale and zero point are chosen


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  damp_percent: float = 0.01, block_size: int = 128, act_order: bool = False,
                  observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K], H [K, K] -> (codes uint8 [N, K], scales float32 [N, G], zeros uint8 [N, G]), as rtn.quantize_int4.
    observer: "minmax" (each group's full range) or "mse" (each group's range clipped where that lowers its error)."""
    group_params = OBSERVERS[observer]
    W = W.float().clone()
    N, K = W.shape
    gs = K if group_size <= 0 else group_size
    H = H.float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, pick 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order or gs == K
    if static:
        scales, zeros = group_params(W, gs, symmetric)
    else:
        scales, zeros = W.new_zeros(N, K // gs), torch.zeros(N, K // gs, dtype=torch.uint8, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_hessian_factor(H, damp_percent)
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    # With groups chosen on the fly, a group must start and end inside one block (its weights fully updated).
    bs = block_size if static else max(block_size // gs, 1) * gs
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not static and col % gs == 0:
                s, z = group_params(W1[:, i:i + gs], gs, symmetric)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            w, s, z = W1[:, i], scales[:, g], zeros[:, g].float()
            q = (torch.round(w / s) + z).clamp(0, 15)
            codes[:, col] = q.to(torch.uint8)
            e = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None]  # spread the error over the rest of the block
            err1[:, i] = e
        W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]  # the lazy batch update: the whole block's errors at once
    return codes, scales, zeros


def _inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; more damping if H is too ill-conditioned to factor."""
    eye = torch.eye(len(H), device=H.device)
    damp = damp_percent * torch.diag(H).mean()
    for _ in range(5):
        try:
            L = torch.linalg.cholesky(H + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10
    raise RuntimeError("Hessian not positive definite even with heavy damping")


def hessians(layer: nn.Module, names: list[str], inputs: LayerInputs, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / tokens [K, K] in float32 for each named Linear of `layer`, from one pass over the inputs."""
    H, count = {}, {n: 0 for n in names}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.float()
        if name not in H:
            H[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        n = count[name]
        H[name] *= n / (n + len(x))  # a running mean keeps the scale independent of the token count
        H[name] += (2 / (n + len(x))) * x.T @ x
        count[name] = n + len(x)

    observe_inputs(layer, names, inputs, add, batch_size)
    return H


def gptq_layer(layer: nn.Module, inputs: LayerInputs, group_size: int = 128, symmetric: bool = False,
               damp_percent: float = 0.01, act_order: bool = False, batch_size: int = 8,
               observer: str = "minmax") -> None:
    """Quantize every projection of one decoder layer in place (swapped for Int4Linear)."""
    names = list(LAYER_LINEARS)
    H = hessians(layer, names, inputs, batch_size)
    for name in names:
        lin = layer.get_submodule(name)
        codes, scales, zeros = gptq_quantize(lin.weight, H.pop(name), group_size, symmetric, damp_percent,
                                             act_order=act_order, observer=observer)
        bias = None if lin.bias is None else lin.bias.detach()
        set_module(layer, name, Int4Linear.from_codes(codes, scales, zeros, bias, lin.weight.dtype))


def gptq_model(model: nn.Module, ids: torch.Tensor, group_size: int = 128, symmetric: bool = False,
               damp_percent: float = 0.01, act_order: bool = False, batch_size: int = 8,
               observer: str = "minmax") -> nn.Module:
    """GPTQ the whole model from calibration ids [S, T], one decoder layer at a time."""
    quantize_layer_by_layer(model, ids, lambda layer, inp: gptq_layer(
        layer, inp, group_size, symmetric, damp_percent, act_order, batch_size, observer), "GPTQ", batch_size)
    return model


@torch.no_grad()
def gptq_embeddings(model: nn.Module, ids: torch.Tensor, group_size: int = HEAD_GROUP_SIZE,
                    batch_size: int = 8) -> nn.Module:
    """INT4 LM head by GPTQ (and the input embedding: the same rows if tied), in place, after the layers.

    The head's inputs are the final normalised hidden states of the calibration ids, taken from the model as it is
    now (layers already quantized). On SmolLM2 after AWQ, GPTQ g32 cost 3% perplexity where round-to-nearest g32
    cost 8% (README)."""
    X = torch.cat([model.hidden_states(batch) for batch in ids.split(batch_size)]).flatten(0, 1).float()
    H = 2 * X.T @ X / len(X)
    return quantize_embeddings(model, group_size, head_rounding=lambda w: gptq_quantize(w, H, group_size))


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the GPTQ and AWQ entry points (llm-compressor's names)."""
    add_model_args(parser)
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256, help="tokens per calibration sample")
    parser.add_argument("--group-size", type=int, default=0, help="0: 128, or the largest of 64/32 that divides "
                        "every input size (SmolLM2's 576 needs 64)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric INT4 (zero point fixed at 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward")
    parser.add_argument("--output-dir", type=Path, help="export an AutoAWQ-format checkpoint here (vLLM loads it)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--out", type=Path, help="write the run's figures as JSON")


def run_method(args, method: str, quantize) -> None:
    """Load, calibrate, quantize with `quantize(model, ids, group_size)`, report, optionally export."""
    from core.generate import SamplingParams, chat_prompt, generate
    from core.loading import load_model
    from core.measure import gpu_peak_mb, peak_rss_mb
    from quantization.linear import pick_group_size

    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    device = next(lm.model.parameters()).device
    gs = pick_group_size(lm.model, args.group_size)
    ids = calibration_ids(lm.tokenizer, args.num_calibration_samples, args.max_seq_length)
    t0 = time.perf_counter()
    quantize(lm.model, ids, gs)
    seconds = time.perf_counter() - t0
    answer = generate(lm.model, [chat_prompt(lm.tokenizer, args.prompt)], SamplingParams(max_tokens=24)).tokens[0]
    text = lm.tokenizer.decode(answer, skip_special_tokens=True)
    row = {"model": lm.label, "method": method, "group_size": gs, "symmetric": args.symmetric,
           "calibration": f"{args.num_calibration_samples} x {args.max_seq_length} tokens, calibration split",
           "quantize_s": seconds, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu_peak_mb(device),
           "prompt": args.prompt, "greedy_answer": text}
    if args.output_dir:
        from quantization.export import export_awq

        export_awq(lm, args.output_dir, gs, method)
        row["output_dir"] = str(args.output_dir)
    print(f"\n{method} INT4 g{gs} {'sym' if args.symmetric else 'asym'} of {lm.label} on {device}: "
          f"{seconds:.1f} s ({row['calibration']}), peak RSS {row['peak_rss_mb']:.0f} MB")
    print(f"  {args.prompt!r} -> {text!r}")
    if args.output_dir:
        print(f"  exported to {args.output_dir} (AutoAWQ GEMM format, quant_method awq)")
    if args.out:
        args.out.write_text(json.dumps(row, indent=2))


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.gptq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_args(parser)
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument("--act-order", action="store_true", help="quantize busy input channels first (desc_act)")
    parser.add_argument("--observer", choices=list(OBSERVERS), default="minmax",
                        help="group scales from each group's full range, or clipped where that lowers the error")
    args = parser.parse_args(argv)
    run_method(args, "GPTQ", lambda model, ids, gs: gptq_model(
        model, ids, gs, args.symmetric, args.damp_percent, args.act_order, args.batch_size, args.observer))


if __name__ == "__main__":
    main()
