"""Packing round trips, RTN error bounds, quantized Linear modules against their float reference."""
import pytest
import torch
from torch import nn

from quantization import packing
from quantization.linear import (Int4Embedding, Int4Linear, Int8Linear, quantize_embeddings, quantize_model,
                                 set_backend, weight_bytes)
from quantization.rtn import (dequantize_int4, dequantize_int8, int4_params, int4_params_mse, quantize_int4,
                              quantize_int4_with, quantize_int8)


def codes(*shape, seed=0):
    return torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("pack,unpack,shape", [
    (packing.pack_int4, packing.unpack_int4, (24, 64)),
    (packing.pack_gptq, packing.unpack_gptq, (64, 24)),
    (packing.pack_gptq_zeros, packing.unpack_gptq_zeros, (3, 24)),
    (packing.pack_awq, packing.unpack_awq, (64, 24)),
])
def test_pack_unpack_round_trip(pack, unpack, shape):
    c = codes(*shape)
    packed = pack(c)
    assert packed.numel() * packed.element_size() * 2 == c.numel()  # 4 bits each, nothing wasted
    assert torch.equal(unpack(packed), c)


def test_packing_layouts_are_the_documented_ones():
    c = torch.arange(16, dtype=torch.uint8).repeat(1, 1)  # [1, 16]: codes 0..15
    assert packing.pack_int4(c)[0, 0].item() == 0x10  # code 0 low nibble, code 1 high nibble
    row = torch.arange(8, dtype=torch.uint8)[None]  # one AWQ word of columns 0..7
    word = packing.pack_awq(row)[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == packing.AWQ_ORDER
    col = torch.arange(8, dtype=torch.uint8)[:, None]  # one GPTQ word of input rows 0..7
    word = packing.pack_gptq(col)[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(range(8))


def test_int8_error_within_half_a_step():
    w = torch.randn(32, 256)
    q, s = quantize_int8(w)
    assert (dequantize_int8(q, s) - w).abs().le(s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_error_within_half_a_step(symmetric):
    w = torch.randn(32, 256)
    c, s, z = quantize_int4(w, 64, symmetric)
    assert c.max() <= 15 and s.shape == (32, 4)
    err = (dequantize_int4(c, s, z) - w).abs().view(32, 4, 64)
    # Symmetric clamps the top code (8 + 7 = 15 is the largest, -8 the smallest): the bound still holds.
    assert err.le(s[..., None] / 2 + 1e-5).all()


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(32, 256)  # all positive: symmetric wastes half its codes
    e_sym = (dequantize_int4(*quantize_int4(w, 64, True)) - w).pow(2).mean()
    e_asym = (dequantize_int4(*quantize_int4(w, 64, False)) - w).pow(2).mean()
    assert e_asym < 0.5 * e_sym


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_clips_outliers_and_never_loses(symmetric):
    """Heavy-tailed weights: min-max spends the grid on a few extremes; the clipped range must lose less in every
    group (the search includes shrink 1, which is min-max) and less overall."""
    w = torch.distributions.StudentT(2.0).sample((32, 256))
    def group_error(params):
        d = dequantize_int4(quantize_int4_with(w, *params), *params) - w
        return d.abs().pow(2.4).view(32, 4, 64).sum(-1)
    minmax, mse = int4_params(w, 64, symmetric), int4_params_mse(w, 64, symmetric)
    assert (group_error(mse) <= group_error(minmax) + 1e-5).all()
    assert group_error(mse).sum() < 0.97 * group_error(minmax).sum()
    assert (mse[0] < minmax[0]).any()  # some ranges were really clipped


def linear(k=256, n=96, bias=True):
    torch.manual_seed(0)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("backend", ["dequant", "torch"])
def test_int8_linear_matches_float_reference(backend):
    lin, x = linear(), torch.randn(5, 256)
    m = Int8Linear.from_linear(lin)
    m.backend = backend
    ref = x @ m.dequantized_weight().T + lin.bias
    assert torch.allclose(m(x), ref, atol=1e-4, rtol=1e-4)
    # ... and close to the unquantized layer (relative error of the output, INT8 per channel: well under 2%).
    assert (m(x) - lin(x)).norm() / lin(x).norm() < 0.02


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("backend", ["dequant", "torch"])
def test_int4_linear_matches_float_reference(symmetric, backend):
    lin, x = linear(), torch.randn(3, 4, 256)
    m = Int4Linear.from_linear(lin, 64, symmetric)
    m.backend = backend
    ref = x @ m.dequantized_weight().T + lin.bias
    tol = 1e-4 if backend == "dequant" else 3e-2  # the torch kernel computes in bfloat16
    assert (m(x) - ref).norm() / ref.norm() < tol
    assert (m(x) - lin(x)).norm() / lin(x).norm() < 0.15


def test_wrong_packing_fails_the_reference_check():
    """The bound above is tight enough to catch swapped nibbles: a layout bug cannot pass."""
    lin, x = linear(), torch.randn(3, 256)
    m = Int4Linear.from_linear(lin, 64)
    good = (m(x) - lin(x)).norm() / lin(x).norm()
    m.qweight.copy_((m.qweight << 4) | (m.qweight >> 4))  # swap the two codes in every byte
    bad = (m(x) - lin(x)).norm() / lin(x).norm()
    assert good < 0.15 < bad


def test_group_size_must_divide_the_input():
    with pytest.raises(ValueError):
        Int4Linear(576, 64, group_size=128)


def test_quantize_model_swaps_every_projection_and_shrinks_it():
    from core.loading import load_model

    model = load_model("tiny", "cpu", "float32", random_weights=True).model
    ids = torch.randint(0, 1000, (1, 16))
    ref = model(ids)
    before = weight_bytes(model)
    quantize_model(model, "int4", 32)
    kinds = {type(m) for layer in model.layers for m in layer.modules() if isinstance(m, (nn.Linear, Int4Linear))}
    assert kinds == {Int4Linear}
    assert weight_bytes(model) < before
    assert torch.nn.functional.cosine_similarity(model(ids).flatten(), ref.flatten(), dim=0) > 0.99
    set_backend(model, "torch")
    assert torch.nn.functional.cosine_similarity(model(ids).flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("tied", [True, False])
def test_int4_embeddings_are_the_dequantized_rows_and_a_tied_pair_is_one_copy(tied):
    import dataclasses

    from core.loading import build_random
    from core.registry import REGISTRY

    cfg = dataclasses.replace(REGISTRY["tiny"].config, tie_word_embeddings=tied)
    model = build_random(cfg, torch.device("cpu"), torch.float32)
    table, head = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    before = weight_bytes(model)
    quantize_embeddings(model, group_size=32)
    assert isinstance(model.embed_tokens, Int4Embedding) and isinstance(model.lm_head, Int4Linear)
    assert (model.embed_tokens.table is model.lm_head) == tied
    rows = model.embed_tokens.table.dequantized_weight()
    assert torch.equal(model.embed_tokens(ids), rows[ids])  # the lookup dequantizes exactly the gathered rows
    assert (rows - table).abs().max() < 0.6 * (table.abs().max() / 7)  # within a step of the original
    x = torch.randn(3, cfg.hidden_size)
    assert torch.allclose(model.lm_head(x), x @ model.lm_head.dequantized_weight().T, atol=1e-5)
    assert not torch.equal(model.lm_head.dequantized_weight(), head)
    # 32-bit tables become 4-bit codes plus a scale and zero per 32: each table shrinks about 6x
    table_bytes = table.numel() * 4 * (1 if tied else 2)
    assert before - weight_bytes(model) > 0.8 * table_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_gpu_kernels_match_dequant_reference(cls):
    lin = linear(4096, 512).cuda().to(torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    m = Int8Linear.from_linear(lin) if cls == "int8" else Int4Linear.from_linear(lin, 128)
    ref = x.float() @ m.dequantized_weight().float().T + lin.bias.float()
    for backend in ("dequant", "torch"):
        m.backend = backend
        assert (m(x).float() - ref).norm() / ref.norm() < 2e-2, backend


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 200])  # the matrix-vector kernel, the GEMM, dequantize + cuBLAS
def test_gpu_int4_lm_head_of_smollm2_shape_matches_dequant_reference(rows):
    """The case study's INT4 head (49,152 x 576, groups of 32) through the Triton backend."""
    lin = linear(576, 49152).cuda().to(torch.float16)
    m = Int4Linear.from_linear(lin, 32)
    x = torch.randn(rows, 576, device="cuda", dtype=torch.float16)
    ref = x.float() @ m.dequantized_weight().float().T + lin.bias.float()
    for backend in ("dequant", "torch", "triton"):
        m.backend = backend
        assert (m(x).float() - ref).norm() / ref.norm() < 2e-2, backend
