"""The shared core: a Llama-family model in plain PyTorch, loading, a model registry, generation and data.

Chapters build on these names; everything else in `core` is an implementation detail of one of them.
"""
from core.config import ModelConfig
from core.errors import UserError
from core.kv_cache import KVCache, StaticKVCache
from core.model import Transformer

__all__ = ["ModelConfig", "UserError", "KVCache", "StaticKVCache", "Transformer"]
