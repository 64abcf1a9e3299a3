"""The planner's arithmetic against hand-computed numbers for Llama-2 shapes."""
import pytest

from core.errors import UserError
from core.registry import REGISTRY
from parallelism.planner import HARDWARE, kv_heads_per_rank, main, plan, ring_all_reduce_s, splits

H100 = HARDWARE["h100-sxm"]
L70 = REGISTRY["llama2-70b"].config
L7 = REGISTRY["llama2-7b"].config


def test_one_gpu_holds_every_parameter():
    p = plan(L7, 1, 1, H100)
    assert p.weights_gb_per_gpu * 1e9 == pytest.approx(L7.num_params() * 2)
    assert p.kv_bytes_per_token_per_gpu == L7.kv_bytes_per_token(2)
    assert p.allreduce_per_token == 0 and p.comm_ms_per_token == 0


def test_llama2_70b_on_8_gpus_all_reduce_traffic():
    p = plan(L70, 8, 1, H100, batch_size=1)
    assert p.allreduce_per_token == 2 * 80  # one after attention, one after the MLP, per layer
    assert p.allreduce_bytes_per_token == 2 * 80 * 8192 * 2  # [1, hidden] in bf16 each time
    assert p.weights_gb_per_gpu * 8 == pytest.approx(L70.num_params() * 2 / 1e9, rel=1e-3)
    assert p.kv_bytes_per_token_per_gpu == L70.kv_bytes_per_token(2) / 8  # 8 KV heads, one per rank
    one = ring_all_reduce_s(8192 * 2, 8, H100)
    assert p.comm_ms_per_token == pytest.approx(160 * one * 1e3)


def test_70b_does_not_fit_one_gpu_but_fits_eight():
    assert not plan(L70, 1, 1, H100).fits
    assert plan(L70, 8, 1, H100).fits and plan(L70, 1, 8, H100).fits


def test_pipeline_divides_memory_but_not_latency():
    tp, pp = plan(L70, 8, 1, H100), plan(L70, 1, 8, H100)
    assert pp.weights_gb_per_gpu == pytest.approx(tp.weights_gb_per_gpu, rel=0.05)
    assert pp.decode_ms_per_token > 4 * tp.decode_ms_per_token


def test_kv_heads_replicate_when_ranks_exceed_them():
    assert kv_heads_per_rank(L70, 16) == 1 and kv_heads_per_rank(L70, 4) == 2
    smollm = REGISTRY["smollm2-135m"].config
    assert kv_heads_per_rank(smollm, 9) == 1  # 3 KV heads copied to 9 ranks


def test_splits_cover_every_factorisation():
    assert splits(8, L70) == [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert splits(3, REGISTRY["tiny"].config) == [(3, 1)]  # 3 stages > the tiny model's 2 layers


def test_bad_split_is_a_user_error():
    with pytest.raises(UserError):
        plan(L7, 64, 1, H100)


def test_cli_prints_a_table(capsys):
    main(["--model", "llama2-70b", "--num-gpus", "8"])
    out = capsys.readouterr().out
    assert "decode_ms/step" in out and "does not fit" not in out
    with pytest.raises(SystemExit) as e:
        main(["--model", "no-such-model"])
    assert e.value.code == 2
