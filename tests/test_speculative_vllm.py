"""The checkpoints speculative.vllm_spec hands to vLLM compute what our draft and Medusa heads compute."""
import json

import torch
from safetensors.torch import load_file

from core.loading import find_model_dir, load_model
from speculative.draft import shallow_draft
from speculative.medusa import MedusaHeads
from speculative.vllm_spec import export_medusa, export_shallow_draft, summarize


def test_exported_shallow_draft_equals_shallow_draft(smollm, tmp_path):
    layers = [0, 1, 28, 29]
    out = export_shallow_draft(find_model_dir("smollm2-135m"), layers, tmp_path / "draft")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert (out / "tokenizer.json").exists()
    exported = load_model(str(out), "cpu", "float32").model
    ids = torch.tensor([[1, 504, 3287, 314, 260, 1345]])
    with torch.inference_mode():
        assert torch.allclose(exported(ids), shallow_draft(smollm.model, layers)(ids), atol=1e-4)


def test_exported_medusa_follows_vllm_residual_block(tiny, tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(tiny.model.config.hidden_size, 3)
    for block in heads.blocks:
        torch.nn.init.normal_(block.weight, std=0.3)
        torch.nn.init.normal_(block.bias, std=0.3)
    out = export_medusa(heads, tiny.model, tmp_path / "medusa")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_heads"] == 3 and cfg["medusa_fc_bias"] and cfg["model_type"] == "medusa"
    w = load_file(str(out / "model.safetensors"))
    h = torch.randn(5, tiny.model.config.hidden_size)
    with torch.no_grad():
        ours = heads(h, tiny.model.lm_head)  # [5, K, V]
        for i in range(3):  # vLLM's ResidualBlock: x + SiLU(W x + b), then that head's LM head
            x = h + torch.nn.functional.silu(h @ w[f"blocks.{i}.layers.0.weight"].T + w[f"blocks.{i}.layers.0.bias"])
            assert torch.allclose(x @ w[f"lm_heads.{i}.weight"].T, ours[:, i], atol=1e-5)


def test_summarize_per_kind_and_counters():
    work = [("chat", "a"), ("chat", "b"), ("code", "c")]
    results = {
        "none": {"tokens": [[1, 2], [3], [4, 5]], "seconds": [2.0, 1.0, 4.0]},
        "ngram": {"tokens": [[1, 2], [3], [4, 6]], "seconds": [1.0, 0.5, 1.0], "num_drafts": 4,
                  "num_draft_tokens": 16, "num_accepted_tokens": 6, "accepted_per_pos": [3, 2, 1, 0]},
        "draft": {"error": "engine process died"},
    }
    out = summarize(results, work, ["chat", "code"])["results"]
    assert out["chat"]["ngram"] == {"output_throughput": 3 / 1.5, "speedup": 3.0 / 1.5, "identical_to_plain": True}
    assert out["code"]["ngram"]["speedup"] == 4.0 and not out["code"]["ngram"]["identical_to_plain"]
    assert out["chat"]["draft"] == {"error": "engine process died"}
    assert out["all"]["ngram"] == {"mean_accepted_tokens_per_step": 2.5, "draft_acceptance_rate": 6 / 16,
                                   "acceptance_rate_per_pos": [0.75, 0.5, 0.25, 0.0]}
    assert "none" not in out["all"] and "draft" not in out["all"]
