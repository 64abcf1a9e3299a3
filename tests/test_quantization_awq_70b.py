"""The streaming 70B entry point, on tiny shapes: same result as AWQ of the whole model in memory."""
import json

import torch
from safetensors.torch import save_file

from core.loading import load_model
from quantization.awq import awq_model
from quantization.awq_70b import LayerSource, main, quantize_streaming
from quantization.export import load_awq
from quantization.linear import LAYER_LINEARS


def test_streamed_awq_matches_in_memory_awq(tmp_path):
    lm = load_model("tiny", "cpu", "float32", random_weights=True)
    folder = tmp_path / "tiny"
    folder.mkdir()
    state = {f"model.{k}": v.contiguous() for k, v in lm.model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(lm.model.config.to_hf()))
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))

    src = LayerSource(str(folder), False, torch.device("cpu"), torch.float32)
    info = quantize_streaming(src, ids, tmp_path / "out", 32, n_grid=5, search_samples=0, layers_per_shard=1,
                              num_layers=2, batch_size=8)
    assert info["shards"] == 2
    streamed = load_awq(tmp_path / "out")
    awq_model(lm.model, ids, 32, n_grid=5, batch_size=8)
    for a, b in zip(lm.model.layers, streamed.model.layers):
        for name in LAYER_LINEARS:
            assert torch.equal(a.get_submodule(name).codes(), b.get_submodule(name).codes()), name
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.allclose(lm.model(x), streamed.model(x), atol=5e-2)  # float16 scales and embeddings


def test_random_weights_entry_point_runs_and_decodes(tmp_path, capsys):
    main(["--model", "tiny", "--random-weights", "--device", "cpu", "--group-size", "32", "--output-dir",
          str(tmp_path / "q"), "--num-calibration-samples", "2", "--max-seq-length", "32", "--decode",
          "--max-tokens", "4", "--out", str(tmp_path / "r.json")])
    row = json.loads((tmp_path / "r.json").read_text())
    assert "RANDOM" in row["model"] and row["layers"] == 2 and len(row["tokens"]) == 4
    assert "ms/token" in capsys.readouterr().out
