"""The exported AutoAWQ folder: exact round trip through our loader, and vLLM's CPU build answering from it."""
import json
import os
import subprocess
import sys

import pytest
import torch

from core.loading import load_model
from quantization.export import export_awq, load_awq
from quantization.linear import LAYER_LINEARS, quantize_model


def test_export_round_trip_is_exact(tmp_path):
    lm = load_model("tiny", "cpu", "float32", random_weights=True)
    quantize_model(lm.model, "int4", 32)
    for m in lm.model.modules():  # the file stores float16 scales: make ours exactly representable
        if hasattr(m, "zeros"):
            m.scales.copy_(m.scales.half().float())
    export_awq(lm, tmp_path, 32, "rtn")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["group_size"] == 32 and qc["zero_point"]
    back = load_awq(tmp_path)
    assert back.random_weights
    for a, b in zip(lm.model.layers, back.model.layers):
        for name in LAYER_LINEARS:
            qa, qb = a.get_submodule(name), b.get_submodule(name)
            assert torch.equal(qa.codes(), qb.codes()) and torch.equal(qa.zeros, qb.zeros)
            assert torch.equal(qa.scales, qb.scales)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids), back.model(ids), atol=1e-2)  # embeddings stored in float16


def test_export_refuses_an_unquantized_model(tmp_path):
    from core.errors import UserError

    lm = load_model("tiny", "cpu", "float32", random_weights=True)
    with pytest.raises(UserError):
        export_awq(lm, tmp_path, 32)


@pytest.mark.slow  # vLLM's start-up alone takes minutes on 2 shared cores
def test_vllm_cpu_loads_our_awq_export(tmp_path):
    pytest.importorskip("vllm")
    lm = load_model("smollm2-135m", "cpu", "float32")
    quantize_model(lm.model, "int4", 64)
    export_awq(lm, tmp_path / "awq", 64, "rtn")
    out = tmp_path / "vllm.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "quantization.vllm_check", str(tmp_path / "awq"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in json.loads(out.read_text())["text"]
