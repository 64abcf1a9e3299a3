"""Medusa training data: batched answers and hidden states line up with the labels; the prompts-file path runs."""
import json

import pytest
import torch

from core.errors import UserError
from core.generate import SamplingParams, generate
from speculative.medusa import load_heads
from speculative.train_medusa import export_prompts, head_batches, read_prompts, self_distillation_data

PROMPTS = [[1, 5, 9, 13, 2], [1, 7, 8, 9, 7, 8, 3, 4, 5], [1, 2, 3, 4], [1, 40, 41, 42, 43, 44, 45]]


def test_batched_data_equals_one_prompt_at_a_time(tiny):
    m = tiny.model
    batched = self_distillation_data(m, PROMPTS, 12, batch_size=3)
    for prompt, (h, answer) in zip(PROMPTS, batched):
        alone = generate(m, [prompt], SamplingParams(max_tokens=12)).tokens[0]
        assert answer.tolist() == alone
        with torch.inference_mode():
            full = m.hidden_states(torch.tensor([prompt + alone]))[0]
        assert torch.allclose(h, full[len(prompt) - 1:-1], atol=1e-5)
        # Greedy answers: the LM head on hidden[t] picks answer[t], so hidden t is aligned with its next token.
        assert m.lm_head(h).argmax(-1).tolist() == answer.tolist()


def test_head_targets_are_the_tokens_k_ahead():
    answer = torch.tensor([10, 11, 12, 13])
    _, nexts, y = head_batches([(torch.zeros(4, 8), answer)], 3)
    assert nexts.tolist() == [10, 11, 12, 13]  # what the target picks from each hidden state
    assert y.tolist() == [[11, 12, 13], [12, 13, -100], [13, -100, -100], [-100, -100, -100]]


def test_prompts_file_is_checked(tmp_path):
    path = tmp_path / "p.json"
    export_prompts(path, "tiny", PROMPTS, 16)
    assert read_prompts(str(path), "tiny", 3, 49152) == PROMPTS[:3]
    with pytest.raises(UserError, match="not for 'smollm2-135m'"):
        read_prompts(str(path), "smollm2-135m", 3, 49152)
    with pytest.raises(UserError, match="fewer than"):
        read_prompts(str(path), "tiny", 5, 49152)
    with pytest.raises(UserError, match="vocabulary"):
        read_prompts(str(path), "tiny", 4, 40)


@pytest.mark.parametrize("kind", ["plain", "chained"])
def test_training_from_a_prompts_file_end_to_end(tiny, tmp_path, kind):
    from speculative.train_medusa import main

    prompts = tmp_path / "p.json"
    export_prompts(prompts, "tiny", PROMPTS, 16)
    out = tmp_path / "tiny.medusa.safetensors"
    main(["--model", "tiny", "--random-weights", "--device", "cpu", "--prompts-file", str(prompts),
          "--num-prompts", "4", "--gen-len", "8", "--epochs", "2", "--batch-size", "8", "--holdout", "0.25",
          "--out", str(out), "--plot", str(tmp_path / "loss.png")] + (["--chained"] if kind == "chained" else []))
    heads = load_heads(out, tiny.model)
    assert len(heads.blocks) == 4 and heads.chained == (kind == "chained")
    record = json.loads((tmp_path / "tiny.medusa.safetensors.train.json").read_text())
    assert record["num_heldout_answers"] == 1 and record["num_train_tokens"] > 0
    assert len(record["heldout_top1_accuracy_per_head"]) == 4
    assert (tmp_path / "loss.png").exists()
