"""Fused q|k|v and gate|up projections (engines/ours/fused_projections.py): the same function as the separate
matmuls, the same greedy tokens from the engine, no weight held twice; quantized projections fused alike (codes,
scales and zeros stacked by rows), and a layer that mixes float and quantized projections served as it is."""
import pytest
import torch

from core.config import ModelConfig
from core.generate import SamplingParams, generate
from core.loading import build_random, load_model
from engines.ours import LLM
from engines.ours.fused_projections import FusedTransformer, fuse_projections
from quantization.linear import Int4Linear, Int8Linear, quantize_model


def random_model(attention_bias: bool) -> torch.nn.Module:
    """Two small GQA layers in float32; with attention_bias, q/k/v biases far from zero (Qwen2's case)."""
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      vocab_size=256, attention_bias=attention_bias)
    model = build_random(cfg, torch.device("cpu"), torch.float32)
    if attention_bias:
        with torch.no_grad():
            for layer in model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    return model


@pytest.mark.parametrize("attention_bias", [False, True])
def test_fused_layers_equal_separate_projections(attention_bias):
    model = random_model(attention_bias)
    ids = torch.randint(0, 256, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    x = torch.randn(2, 9, 64)
    cos, sin = model.rope(positions, x.dtype)
    with torch.no_grad():
        want_layer = model.layers[0](x, cos, sin, positions, None)
        want_prefill, want_decode = model(ids), model(ids[:, :1])
        fused = fuse_projections(model)
        assert isinstance(fused, FusedTransformer)
        torch.testing.assert_close(fused.layers[0](x, cos, sin, positions, None), want_layer)
        torch.testing.assert_close(fused(ids), want_prefill)
        torch.testing.assert_close(fused(ids[:, :1]), want_decode)  # T == 1 takes core's other attention path
        torch.testing.assert_close(model(ids), want_prefill)  # the original still computes what it did


def test_fusion_holds_no_weight_twice():
    model = random_model(attention_bias=True)
    count = sum(p.numel() for p in model.parameters())
    fused = fuse_projections(model)
    assert sum(p.numel() for p in fused.parameters()) == count
    attn, qkv = model.layers[0].self_attn, fused.layers[0].self_attn.qkv_proj
    up, gate_up = model.layers[1].mlp.up_proj, fused.layers[1].mlp.gate_up_proj
    # The model's own projections are views into the stacked tensors: one storage each.
    assert attn.v_proj.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
    assert attn.k_proj.bias.untyped_storage().data_ptr() == qkv.bias.untyped_storage().data_ptr()
    assert up.weight.data_ptr() == gate_up.weight[96:].data_ptr()
    assert fused.layers[0].input_layernorm is model.layers[0].input_layernorm
    again = fuse_projections(model)  # a second engine on the same model: the same stacked tensors, not a copy
    assert again.layers[0].self_attn.qkv_proj.weight.data_ptr() == qkv.weight.data_ptr()
    assert again.layers[1].mlp.gate_up_proj.weight.data_ptr() == gate_up.weight.data_ptr()


@pytest.mark.parametrize("fuse", [True, False])
def test_engine_greedy_equals_plain_generation(fuse):
    """float64, as in test_engines_core: batching-order rounding stays far below the gaps between logits."""
    lm = load_model("tiny", "cpu", torch.float64, random_weights=True)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [[5, 9, 13, 200, 7], list(range(3, 40)), [11] * 12, [42]]
    want = [generate(lm.model, [p], params).tokens[0] for p in prompts]
    llm = LLM(lm, block_size=4, num_kv_blocks=64, max_model_len=64, max_num_batched_tokens=16,
              fuse_projections=fuse)
    assert isinstance(llm.runner.model, FusedTransformer) == fuse
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert [generate(lm.model, [p], params).tokens[0] for p in prompts] == want  # the caller's model unharmed


def test_quantized_projection_is_left_unfused():
    lm = load_model("tiny", "cpu", torch.float64, random_weights=True)
    attn = lm.model.layers[1].self_attn
    attn.k_proj = Int8Linear.from_linear(attn.k_proj)  # one quantized projection is enough
    assert fuse_projections(lm.model) is lm.model
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 13, 200, 7], list(range(3, 30))]
    llm = LLM(lm, block_size=4, num_kv_blocks=64, max_model_len=64)
    assert llm.runner.model is lm.model and type(lm.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == \
        [generate(lm.model, [p], params).tokens[0] for p in prompts]


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_projections_fuse(method):
    """An INT4 (g16, asymmetric) or INT8 model: fused layers compute what the separate quantized projections do,
    the stacked codes are the only copy, and the engine's greedy tokens equal plain generation."""
    lm = load_model("tiny", "cpu", torch.float64, random_weights=True)
    quantize_model(lm.model, method, group_size=16)
    ids = torch.randint(0, 256, (2, 9))
    codes = sum(b.numel() for b in lm.model.buffers())
    with torch.no_grad():
        want = lm.model(ids)
        fused = fuse_projections(lm.model)
        assert isinstance(fused, FusedTransformer)
        qkv = fused.layers[0].self_attn.qkv_proj
        assert type(qkv) is (Int4Linear if method == "int4" else Int8Linear)
        assert qkv.out_features == sum(p.out_features for p in (lm.model.layers[0].self_attn.q_proj,
                                       lm.model.layers[0].self_attn.k_proj, lm.model.layers[0].self_attn.v_proj))
        torch.testing.assert_close(fused(ids), want)
        torch.testing.assert_close(lm.model(ids), want)  # the caller's model, now over views, unchanged
    assert sum(b.numel() for b in fused.buffers()) == codes
    v = lm.model.layers[0].self_attn.v_proj
    assert v.qweight.untyped_storage().data_ptr() == qkv.qweight.untyped_storage().data_ptr()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 13, 200, 7], list(range(3, 30))]
    llm = LLM(lm, block_size=4, num_kv_blocks=64, max_model_len=64)
    assert isinstance(llm.runner.model, FusedTransformer)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == \
        [generate(lm.model, [p], params).tokens[0] for p in prompts]
