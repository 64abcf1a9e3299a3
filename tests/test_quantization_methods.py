"""GPTQ and AWQ against references: RTN's error on the same data, and the unscaled model's function."""
import copy

import pytest
import torch

from core.config import ModelConfig
from core.loading import build_random, load_model
from quantization.awq import awq_layer, awq_model, scale_layer
from quantization.gptq import gptq_embeddings, gptq_model, gptq_quantize, hessians
from quantization.layerwise import calibration_ids, layer0_inputs, run_layer
from quantization.linear import LAYER_LINEARS, Int4Embedding, Int4Linear, quantize_embeddings, set_module
from quantization.rtn import dequantize_int4, quantize_int4


@pytest.fixture(scope="module")
def smollm_layer0(smollm):
    ids = calibration_ids(smollm.tokenizer, 8, 128)
    return smollm.model.layers[0], layer0_inputs(smollm.model, ids)


@pytest.mark.parametrize("act_order,observer", [(False, "minmax"), (True, "minmax"), (True, "mse")])
@pytest.mark.parametrize("name", ["self_attn.q_proj", "mlp.down_proj"])
def test_gptq_reconstruction_error_below_rtn(smollm_layer0, name, act_order, observer):
    layer, inputs = smollm_layer0
    H = hessians(layer, [name], inputs)[name]
    W = layer.get_submodule(name).weight.detach()
    # The layer loss GPTQ minimises, tr((W - Q) H (W - Q)^T), is the output error on the calibration data.
    def loss(Q):
        D = (W - Q).float()
        return torch.einsum("nk,kj,nj->", D, H, D).item()

    rtn = loss(dequantize_int4(*quantize_int4(W, 64)))
    codes, scales, zeros = gptq_quantize(W, H, 64, act_order=act_order, observer=observer)
    assert codes.max() <= 15 and scales.shape == (W.shape[0], W.shape[1] // 64)
    gptq = loss(dequantize_int4(codes, scales, zeros))
    assert gptq < 0.9 * rtn


def test_gptq_with_identity_hessian_is_rtn():
    """With uncorrelated, equal-variance inputs there is no error to push anywhere: GPTQ reduces to rounding."""
    W = torch.randn(16, 128)
    codes, scales, zeros = gptq_quantize(W, torch.eye(128), 64, damp_percent=0.0)
    ref = quantize_int4(W, 64)
    assert torch.equal(codes, ref[0]) and torch.allclose(scales, ref[1]) and torch.equal(zeros, ref[2])


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (no v->o fold) and MHA (v->o fold)
def test_awq_scaling_keeps_the_function(kv_heads):
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=kv_heads,
                      head_dim=16, vocab_size=256)
    model = build_random(cfg, torch.device("cpu"), torch.float64)
    # Uneven activation and norm magnitudes, so the search picks scales far from 1.
    with torch.no_grad():
        model.layers[0].input_layernorm.weight.copy_(torch.linspace(0.1, 3, 64, dtype=torch.float64))
    ids = torch.randint(0, 256, (4, 32))
    ref = model(ids)
    found = scale_layer(model.layers[0], layer0_inputs(model, ids), group_size=32)
    assert ("o" in found) == (kv_heads == 4)
    assert any((s - 1).abs().max() > 0.1 for s in found.values())  # it really rescaled something
    assert torch.allclose(model(ids), ref, atol=1e-9, rtol=1e-9)


def test_awq_layer_error_below_rtn(smollm_layer0):
    layer, inputs = smollm_layer0
    ref = run_layer(layer, inputs)
    errors = {}
    for method in ("rtn", "awq"):
        q = copy.deepcopy(layer)
        if method == "awq":
            awq_layer(q, inputs, 64, n_grid=10)  # a coarser grid: half the time, still a clear win
        else:
            for name in LAYER_LINEARS:
                set_module(q, name, Int4Linear.from_linear(q.get_submodule(name), 64))
        errors[method] = (run_layer(q, inputs) - ref).pow(2).mean().item()
    assert errors["awq"] < errors["rtn"]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_end_to_end_on_tiny(method):
    lm = load_model("tiny", "cpu", "float32", random_weights=True)
    ids = calibration_ids(lm.tokenizer, 4, 64)
    ref = lm.model(ids[:1])
    (gptq_model if method == "gptq" else awq_model)(lm.model, ids, 32)
    swapped = [type(layer.get_submodule(n)) for layer in lm.model.layers for n in LAYER_LINEARS]
    assert swapped == [Int4Linear] * len(swapped)
    assert torch.nn.functional.cosine_similarity(lm.model(ids[:1]).flatten(), ref.flatten(), dim=0) > 0.99


def test_gptq_lm_head_beats_round_to_nearest_on_the_calibration_logits(smollm):
    ids = calibration_ids(smollm.tokenizer, 4, 128)
    with torch.no_grad():
        hidden = smollm.model.hidden_states(ids)
        ref = smollm.model.lm_head(hidden)
    errors = {}
    for name, quantize in (("rtn", quantize_embeddings), ("gptq", lambda m: gptq_embeddings(m, ids))):
        model = copy.deepcopy(smollm.model)
        quantize(model)
        assert isinstance(model.embed_tokens, Int4Embedding) and model.embed_tokens.table is model.lm_head  # tied
        with torch.no_grad():
            errors[name] = (model.lm_head(hidden) - ref).pow(2).mean().item()
    assert errors["gptq"] < 0.8 * errors["rtn"]
