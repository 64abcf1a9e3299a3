"""The KV memory formula against the measured size of our caches, and the capacity arithmetic."""
import copy
import subprocess
import sys

import pytest
import torch

from core.errors import UserError
from core.kv_cache import StaticKVCache
from core.registry import REGISTRY
from kvcache.memory import kv_bytes_per_sequence, kv_bytes_per_token, max_batch_size, max_tokens_in_cache
from kvcache.policies import make_cache


@pytest.mark.parametrize("name", list(REGISTRY))
def test_bytes_per_token_from_shape(name):
    c = REGISTRY[name].config
    assert kv_bytes_per_token(c, "bfloat16") == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
    assert kv_bytes_per_token(c, "fp8") == kv_bytes_per_token(c, "bfloat16") / 2


def test_known_model_numbers():
    # Llama-2-7B: 32 layers x 32 heads x 128 x 2 (K, V) x 2 bytes = 512 KiB per token, 2 GiB per 4k sequence.
    c = REGISTRY["llama2-7b"].config
    assert kv_bytes_per_token(c) == 512 * 1024
    assert kv_bytes_per_sequence(c, 4096) == 2 * 2**30
    free = 80 * 2**30 * 0.9 - c.num_params() * 2
    assert max_batch_size(c, 4096, 80) == int(free // (2 * 2**30))
    assert max_tokens_in_cache(c, 80) == int(free // (512 * 1024))
    assert max_batch_size(REGISTRY["llama2-70b"].config, 4096, 80) == 0  # 140 GB of weights do not fit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_formula_matches_measured_caches(tiny, dtype):
    model = copy.deepcopy(tiny.model).to(getattr(torch, dtype))  # a copy: a round trip through bf16 would alter the shared fixture
    cfg, n = model.config, 37
    ids = torch.randint(0, cfg.vocab_size, (1, n))
    static = StaticKVCache.for_model(model, 1, n)
    full = make_cache("full", model)
    q8, q4 = make_cache("int8", model, max_len=n), make_cache("int4", model, max_len=n)
    with torch.inference_mode():
        for cache in (static, full, q8, q4):
            model(ids, cache=cache)
    assert static.nbytes() == full.nbytes() == kv_bytes_per_sequence(cfg, n, dtype)
    assert q8.nbytes() == kv_bytes_per_sequence(cfg, n, "int8")
    assert q4.nbytes() == kv_bytes_per_sequence(cfg, n, "int4")


def test_bad_dtype():
    with pytest.raises(UserError, match="unknown kv_cache_dtype 'fp7'"):
        kv_bytes_per_token(REGISTRY["tiny"].config, "fp7")


def test_cli_bad_model_is_one_line():
    r = subprocess.run([sys.executable, "-m", "kvcache.memory", "--model", "nope"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model 'nope'") and "Traceback" not in r.stderr
