"""The GPU decode bench's code path on CPU: layer-by-layer quantized build, every config runs, JSON written."""
import json
import math

import torch

from quantization.gpu_bench import build, main
from quantization.linear import LAYER_LINEARS, Int4Linear, Int8Linear, weight_bytes


def test_streamed_build_quantizes_every_projection():
    bf16, _ = build("tiny", "cpu", "bf16", "dequant", 32)
    for precision, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        lm, err = build("tiny", "cpu", precision, "torch", 32)
        assert err < 2e-2  # the kernel against the dequantized weights
        mods = [layer.get_submodule(n) for layer in lm.model.layers for n in LAYER_LINEARS]
        assert all(isinstance(m, cls) and m.backend == "torch" for m in mods)
        assert lm.random_weights and weight_bytes(lm.model) < weight_bytes(bf16.model)
        assert not any(p.is_meta for p in lm.model.parameters()) and not any(b.is_meta for b in lm.model.buffers())
        with torch.no_grad():
            assert torch.isfinite(lm.model(torch.arange(8)[None]).float()).all()


def test_cli_runs_on_cpu(tmp_path, capsys):
    main(["--model", "tiny", "--device", "cpu", "--configs", "bf16,int4:torch,int4:torch:op,int4:torch:pdl",
          "--max-tokens", "4", "--prompt-len", "8", "--repeats", "1", "--out", str(tmp_path / "b.json")])
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["bf16", "int4:torch", "int4:torch:op", "int4:torch:pdl"]
    assert all("tpot_ms" in r and len(r["tokens"]) == 4 for r in rows)
    assert rows[3]["tokens_match_int4:torch:op"]  # a PDL config is checked against its custom-op twin's tokens
    out = capsys.readouterr().out
    assert "of copy BW" in out and "int4:torch:pdl: tokens identical to int4:torch:op's" in out


def test_kernel_check_catches_a_wrong_layout():
    import copy

    from quantization.gpu_bench import kernel_error

    torch.manual_seed(0)
    q = Int4Linear.from_linear(torch.nn.Linear(256, 64).to(torch.bfloat16), 64)
    q.backend = "torch"
    assert kernel_error(q) < 2e-2
    bad = copy.deepcopy(q)
    bad._kernel = None
    bad.qweight.copy_((bad.qweight << 4) | (bad.qweight >> 4))  # a layout bug: the two codes of each byte swapped
    q._kernel = bad._kernel_weights(torch.device("cpu"))
    assert kernel_error(q) > 0.3


def test_kernel_check_covers_the_decode_row_and_nans():
    """A kernel that is wrong only for one row (the decode's matrix-vector path), with a NaN, must not pass."""
    from quantization.gpu_bench import kernel_error

    class NanForOneRow(Int4Linear):
        def forward(self, x):
            y = super().forward(x)
            if len(x) == 1:
                y[..., 0] = float("nan")
            return y

    q = Int4Linear.from_linear(torch.nn.Linear(256, 64).to(torch.bfloat16), 64)
    q.__class__ = NanForOneRow
    assert math.isnan(kernel_error(q))
