"""The fused elementwise kernels of engines/ours/triton_elementwise.py against core/model.py's eager code: each
kernel alone, and a whole fused decoder layer with them switched on against the same layer with them off.

Triton's CPU interpreter runs the kernels here (in a fresh process: it must be on before Triton is imported); the
gpu-marked test runs the compiled kernels in bfloat16, where the roundings they copy from the eager code matter."""
import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted

from core.config import ModelConfig
from core.loading import build_random
from core.model import RMSNorm, apply_rope


class CausalCache:
    """The one thing a layer asks of a cache: attention over the step's own tokens (causal), as SDPA computes it."""

    def attend(self, layer, q, k, v, positions):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def check_kernels(device: str = "cpu", dtype: torch.dtype = torch.float32, exact: bool = False) -> None:
    from engines.ours.fused_projections import fuse_projections
    from engines.ours.triton_elementwise import rms_norm, rope_qk_, silu_and_mul
    # bfloat16 on a GPU: the kernels round where the eager code rounds, so only the norm's sum order and SiLU's exp
    # may move a value, by one unit in the last place of bfloat16 (2**-7 relative)
    close = dict(rtol=2 ** -7, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    tokens, hidden, heads, kv_heads, head_dim = 7, 96, 4, 2, 16  # hidden not a power of two: masked lanes

    norm = RMSNorm(hidden, 1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x, delta = torch.randn(2, tokens, hidden, device=device, dtype=dtype), torch.randn(2, tokens, hidden,
                                                                                        device=device, dtype=dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), **close)
    total, normed = rms_norm(x, norm.weight, norm.eps, delta=delta)
    torch.testing.assert_close(total, x + delta, rtol=0, atol=0)  # the residual stream itself: exact
    torch.testing.assert_close(normed, norm(x + delta), **close)

    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(2, tokens, width, device=device, dtype=dtype)
    positions = torch.arange(3, 3 + tokens, device=device).expand(2, tokens)
    model = build_random(ModelConfig(hidden_size=hidden, intermediate_size=80, num_layers=2, num_heads=heads,
                                     num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=64),
                         torch.device(device), dtype)
    cos, sin = model.rope(positions, dtype)
    q, k, v = (t.view(2, tokens, -1, head_dim).transpose(1, 2) for t in qkv.split([heads * head_dim,
                                                                                   kv_heads * head_dim,
                                                                                   kv_heads * head_dim], -1))
    want_q, want_k, want_v = apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.clone()
    rope_qk_(qkv, cos, sin, heads, kv_heads, head_dim)
    exactly = dict(rtol=0, atol=0) if exact else close
    torch.testing.assert_close(q, want_q, **exactly)
    torch.testing.assert_close(k, want_k, **exactly)
    torch.testing.assert_close(v, want_v, rtol=0, atol=0)  # v is not rotated

    gate_up = torch.randn(2, tokens, 2 * 80, device=device, dtype=dtype)
    gate, up = gate_up.split(80, -1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, **close)

    # The wiring: a fused layer with the kernels against the same layer without them.
    fused = fuse_projections(model)
    h = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    cos, sin = model.rope(positions[:1], dtype)
    with torch.no_grad():
        want = fused.layers[1](h, cos, sin, positions[:1], CausalCache())
        fused.use_triton_elementwise()
        assert fused.layers[1].triton_elementwise and fused.layers[1].mlp.triton_elementwise
        torch.testing.assert_close(fused.layers[1](h, cos, sin, positions[:1], CausalCache()), want, **close)


def test_elementwise_kernels_match_eager_interpreted():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the compiled kernels are checked instead (test below)")
    run_interpreted("from test_engines_elementwise import check_kernels\ncheck_kernels()\n")


@pytest.mark.gpu
def test_elementwise_kernels_match_eager_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check_kernels("cuda", torch.bfloat16, exact=True)


@pytest.mark.gpu
def test_engine_with_fused_elementwise_equals_plain_generation_on_gpu():
    """The engine's uncompiled CUDA path, where the kernels are on: greedy tokens of plain generation (float32, so
    that rounding-order differences stay far below the gaps between logits)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from core.generate import SamplingParams, generate
    from core.loading import load_model
    from engines.ours import LLM

    lm = load_model("tiny", "cuda", torch.float32, random_weights=True)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [[5, 9, 13, 200, 7], list(range(3, 40)), [11] * 12, [42]]
    want = [generate(lm.model, [p], params).tokens[0] for p in prompts]
    llm = LLM(lm, max_model_len=64, num_kv_blocks=64, torch_compile=False)
    assert llm.runner.model.layers[0].triton_elementwise
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
