"""The llm-compressor comparison's plumbing, without llm-compressor: a dense folder in the layout
quantization.compressor writes, holding our own RTN weights, must score exactly as our RTN row does."""
import json
import shutil

import pytest
from safetensors.torch import save_file

from core.loading import find_model_dir, load_model
from quantization.compare_compressor import main
from quantization.rtn import fake_quantize_int4


@pytest.fixture(scope="module")
def rtn_folder(tmp_path_factory):
    src = find_model_dir("smollm2-135m")
    out = tmp_path_factory.mktemp("llmc")
    lm = load_model("smollm2-135m", "cpu", "float32")
    state = {}
    for name, t in lm.model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        if name.startswith("layers.") and int(name.split(".")[1]) >= 1:
            continue  # a one-layer prefix, as --num-layers 1 writes
        quantized = name.startswith("layers.0.") and name.endswith("proj.weight")
        state[f"model.{name}"] = (fake_quantize_int4(t, 64) if quantized else t).contiguous()
    save_file(state, out / "model.safetensors")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))
    (out / "llmip_compressor.json").write_text(json.dumps({
        "method": "stand-in RTN", "num_layers": 1, "group_size": 64, "calibration": "2 x 32 tokens, calibration split",
        "quantize_s": 0.0, "quantize_cpu_s": 0.0}))
    return out


def test_dense_folder_scores_like_our_rtn(rtn_folder, tmp_path):
    main([str(rtn_folder), "--ours", "rtn", "--eval-tokens", "256", "--window", "128", "--out", str(tmp_path / "c.json")])
    rows = {r["method"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    ours, theirs = rows["ours rtn"]["hidden_rel_error"], rows["stand-in RTN"]["hidden_rel_error"]
    assert 0 < ours < 0.5 and theirs == pytest.approx(ours, rel=1e-4)


def test_not_a_compressor_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "not an output of quantization.compressor" in capsys.readouterr().err
