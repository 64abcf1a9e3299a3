"""The model core against transformers: same logits, same greedy tokens, same RoPE scaling."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from core.config import ModelConfig
from core.generate import SamplingParams, chat_prompt, generate
from core.kv_cache import StaticKVCache
from core.loading import build_random
from core.model import rope_inv_freq

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and explain why they are prime.",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def hf_smollm(smollm):
    hf = AutoModelForCausalLM.from_pretrained(smollm.path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run past EOS, like ignore_eos, to compare 64 tokens every time
    return hf


def test_logits_match_transformers(smollm, hf_smollm):
    ids = torch.tensor([chat_prompt(smollm.tokenizer, PROMPTS[2])])
    with torch.no_grad():
        ours, theirs = smollm.model(ids), hf_smollm(ids).logits
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    assert rel < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_match_transformers(smollm, hf_smollm, prompt):
    ids = chat_prompt(smollm.tokenizer, prompt)
    ours = generate(smollm.model, [ids], SamplingParams(max_tokens=64, ignore_eos=True)).tokens[0]
    with torch.no_grad():
        # An explicit mask: otherwise transformers masks every <|im_end|> of the prompt, since it is also the pad id.
        x = torch.tensor([ids])
        theirs = hf_smollm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False)
    assert len(ours) == 64
    assert ours == theirs[0, len(ids):].tolist()


def _hf_copy(model) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_hf())).eval()
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    return hf


@pytest.mark.parametrize("rope_scaling", [{}, {"rope_type": "linear", "factor": 2.0},
                                          {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_untied_gqa_and_rope_scaling_match_transformers(rope_scaling):
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                      num_kv_heads=2, head_dim=8, rope_theta=500000.0, max_position_embeddings=512,
                      rope_scaling=rope_scaling, tie_word_embeddings=False)
    model = build_random(cfg, torch.device("cpu"), torch.float32, seed=1)
    hf = _hf_copy(model)
    ids = torch.randint(0, 300, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_llama3_rope_changes_long_wavelengths_only():
    base = ModelConfig(head_dim=128, rope_theta=500000.0)
    scaled = ModelConfig(head_dim=128, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(a[:10], b[:10])  # fast-rotating dimensions untouched
    assert torch.allclose(a[-1] / 8, b[-1])  # slowest ones slowed by the factor


def test_cached_decode_equals_full_forward(tiny):
    model = tiny.model
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = StaticKVCache.for_model(model, 1, 40)
        parts = [model(ids[:, :25], None, cache)]
        for t in range(25, 40):
            parts.append(model(ids[:, t:t + 1], torch.tensor([[t]]), cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padded_batch_equals_one_by_one(tiny):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batched = generate(tiny.model, prompts, params).tokens
    single = [generate(tiny.model, [p], params).tokens[0] for p in prompts]
    assert batched == single


def test_num_params_counts_the_built_model(tiny):
    assert tiny.model.config.num_params() == sum(p.numel() for p in tiny.model.parameters())


def test_positional_cache_equals_full_forward_with_padding(tiny):
    from core.kv_cache import EMPTY, PositionalKVCache

    model = tiny.model
    ids = torch.randint(0, 1000, (2, 30), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(30).repeat(2, 1)
    pos[1, :6] = EMPTY  # row 1 is left-padded by 6 tokens
    pos[1, 6:] = torch.arange(24)
    with torch.no_grad():
        full0 = model(ids[:1])
        full1 = model(ids[1:, 6:])
        cache = PositionalKVCache.for_model(model, 2, 30)
        parts = [model(ids[:, :20], pos[:, :20], cache)]
        for t in range(20, 30):
            parts.append(model(ids[:, t:t + 1], pos[:, t:t + 1], cache))
    out = torch.cat(parts, 1)
    assert torch.allclose(out[0], full0[0], atol=1e-5)
    assert torch.allclose(out[1, 6:], full1[0], atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager():
    from core.loading import load_model

    lm = load_model("tiny", "cuda", "float32", random_weights=True)
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert generate(lm.model, prompts, params, cuda_graph=True).tokens == generate(lm.model, prompts, params).tokens


@pytest.mark.gpu
def test_compiled_graphed_decode_equals_eager():
    from core.loading import load_model

    lm = load_model("tiny", "cuda", "float32", random_weights=True)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    fast = generate(lm.model, [[5, 6, 7, 8, 9]], params, cuda_graph=True, compile=True).tokens
    assert fast == generate(lm.model, [[5, 6, 7, 8, 9]], params).tokens


def test_converted_tokenizer_ends_and_pads_with_the_models_eos():
    """The GGUF conversion takes EOS and padding from the generation config: transformers 5.17 read the GGUF's
    special tokens as EOS = <|im_start|> and no padding token, which broke batched transformers generation."""
    from transformers import GenerationConfig

    from core.loading import default_model_dir, load_tokenizer

    gen = GenerationConfig.from_pretrained(default_model_dir())
    tok = load_tokenizer(None)
    assert tok.eos_token_id == gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == gen.pad_token_id
