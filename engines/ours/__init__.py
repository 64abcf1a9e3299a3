"""Our engine: paged KV cache, continuous batching with chunked prefill, preemption, prefix caching, a server.

Read in this order: sequence.py, block_manager.py, scheduler.py, paged_cache.py, model_runner.py, llm_engine.py,
llm.py, server.py.
"""
from core.generate import SamplingParams
from engines.ours.llm import LLM
from engines.ours.llm_engine import LLMEngine
from engines.ours.outputs import RequestOutput

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
