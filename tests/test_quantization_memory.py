"""Memory per precision: the book's arithmetic, the as-shipped estimate against bytes measured on a quantized model."""
import json

import pytest

from core.registry import REGISTRY
from quantization.memory import PRECISIONS, checkpoint_bytes, main, max_params_b, measure_footprints, naive_bytes


def test_naive_ratios_are_the_books():
    cfg = REGISTRY["llama2-70b"].config
    fp32 = naive_bytes(cfg, "fp32")
    assert [naive_bytes(cfg, p) / fp32 for p in ("fp16", "int8", "int4")] == [0.5, 0.25, 0.125]
    # As shipped, INT4 g128 of the 70B lands near the "about 40 GB" of the book, above the naive 34.5 GB.
    assert 34e9 < checkpoint_bytes(cfg, "int4", 128) < 40e9


def test_estimate_matches_measured_footprint():
    measured = measure_footprints("tiny", True, 32)
    cfg = REGISTRY["tiny"].config
    for p in PRECISIONS:
        # INT4 zero points are stored a byte each in memory (half a byte in the checkpoint): the only gap.
        assert measured[p] == pytest.approx(checkpoint_bytes(cfg, p, 32), rel=1e-3), p


def test_max_params_fit():
    assert max_params_b(80, 0.9, 2) == pytest.approx(36.0)


def test_cli_writes_json_without_loading(tmp_path, capsys):
    main(["--model", "llama2-70b", "--measure", "no", "--out", str(tmp_path / "m.json")])
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["random_weights"] and [r["precision"] for r in data["rows"]] == list(PRECISIONS)
    int4 = next(f for f in data["fits"] if f["precision"] == "int4")
    assert "llama2-70b" in int4["registered_models_that_fit"]
    assert "as shipped" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "no-such-model", "--measure", "no"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")
