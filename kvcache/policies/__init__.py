"""KV-cache policies behind core.kv_cache.KVCache: what a cache keeps (and how) once memory is bounded.

    full            every token (the reference)
    window          the last `budget` tokens (sliding-window attention)
    streaming       `sinks` first tokens + the most recent ones, positions inside the cache (StreamingLLM)
    h2o             heavy hitters by accumulated attention + recent tokens, `budget` in all (H2O)
    int8, int4      every token, stored quantized with per-token scales
"""
from __future__ import annotations

from core.errors import UserError
from kvcache.policies.full import FullCache
from kvcache.policies.h2o import H2OCache
from kvcache.policies.quantized import QuantizedKVCache
from kvcache.policies.sliding_window import SlidingWindowCache
from kvcache.policies.streaming import StreamingLLMCache

POLICIES = ("full", "window", "streaming", "h2o", "int8", "int4")


def make_cache(policy: str, model, budget: int = 1024, sinks: int = 4, batch_size: int = 1,
               max_len: int | None = None):
    """A fresh cache of `policy` for `model`. `budget` = tokens a query may attend over (evicting policies);
    `max_len` = capacity of the preallocated quantized caches (defaults to the model's context)."""
    n = model.config.num_layers
    if policy == "full":
        return FullCache(n)
    if policy == "window":
        return SlidingWindowCache(n, budget)
    if policy == "streaming":
        if budget <= sinks:
            raise UserError(f"StreamingLLM budget {budget} must exceed its {sinks} sink tokens")
        return StreamingLLMCache(n, model.inv_freq, sinks, budget - sinks)
    if policy == "h2o":
        return H2OCache(n, budget)
    if policy in ("int8", "int4"):
        p, cfg = next(model.parameters()), model.config
        return QuantizedKVCache(n, batch_size, max_len or cfg.max_position_embeddings, cfg.num_kv_heads,
                                cfg.head_dim, int(policy[3:]), p.dtype, p.device)
    raise UserError(f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})")
