"""What GPTQ and AWQ share: calibration tokens, the inputs of decoder layer 0, and a walk over layers one at a time.

Both methods quantize one decoder layer from the activations that reach it, then run the calibration batch through
the now-quantized layer to get the next layer's inputs. Only one layer's work and one set of activations
[samples, seq_len, hidden] are live at once, so peak memory is one decoder layer plus calibration activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from core.data import plain_text
from core.errors import UserError


def calibration_ids(tokenizer, num_samples: int = 32, seq_len: int = 256, split: str = "calibration",
                    first_sample: int = 0) -> torch.Tensor:
    """[num_samples, seq_len] token ids cut from the ShareGPT `split` (calibration by default) text, starting
    `first_sample` samples in (another draw of the same size, to see how much a result owes to the draw)."""
    end = (first_sample + num_samples) * seq_len
    text = plain_text(split, max_chars=end * 8)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < end:
        raise UserError(f"the {split} split gives {len(ids)} tokens, fewer than {first_sample} + {num_samples} "
                        f"samples of {seq_len}")
    return ids[first_sample * seq_len: end].view(num_samples, seq_len)


@dataclass
class LayerInputs:
    """What a decoder layer is called with, for every calibration sample (no KV cache: full causal attention)."""
    hidden: torch.Tensor  # [S, T, hidden]
    cos: torch.Tensor  # [1, T, head_dim]
    sin: torch.Tensor
    positions: torch.Tensor  # [1, T]

    def batches(self, batch_size: int):
        for i in range(0, len(self.hidden), batch_size):
            yield self.hidden[i:i + batch_size]


def layer0_inputs(model: nn.Module, ids: torch.Tensor) -> LayerInputs:
    """Embed the calibration ids: the inputs of decoder layer 0 (nothing else of the model runs)."""
    device = model.embed_tokens.weight.device
    ids = ids.to(device)
    positions = torch.arange(ids.shape[1], device=device)[None]
    with torch.no_grad():
        hidden = model.embed_tokens(ids)
    cos, sin = model.rope(positions, hidden.dtype)
    return LayerInputs(hidden, cos, sin, positions)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, batch_size: int = 8,
              call: Callable | None = None) -> torch.Tensor:
    """Outputs [S, T, hidden] of `layer` (or of `call(x, cos, sin)`) over all samples, a mini-batch at a time."""
    fn = call or (lambda x, cos, sin: layer(x, cos, sin, inputs.positions, None))
    return torch.cat([fn(x, inputs.cos, inputs.sin) for x in inputs.batches(batch_size)])


@torch.no_grad()
def observe_inputs(layer: nn.Module, names: list[str], inputs: LayerInputs, on_input: Callable[[str, torch.Tensor],
                   None], batch_size: int = 8) -> None:
    """Run the layer and call on_input(name, x [tokens, in_features]) for every input batch of each named Linear."""
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda _m, args, _out, n=n: on_input(n, args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    try:
        run_layer(layer, inputs, batch_size)
    finally:
        for h in hooks:
            h.remove()


def quantize_layer_by_layer(model: nn.Module, ids: torch.Tensor, quantize_layer: Callable[[nn.Module, LayerInputs],
                            None], desc: str, batch_size: int = 8) -> None:
    """For each decoder layer: quantize it in place from its inputs, then feed its outputs to the next layer."""
    inputs = layer0_inputs(model, ids)
    for layer in tqdm(model.layers, desc=desc, unit="layer"):
        quantize_layer(layer, inputs)
        inputs.hidden = run_layer(layer, inputs, batch_size)
