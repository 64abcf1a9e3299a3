"""Backends behind one interface (base.py). Each module has `from_args(args) -> Backend`; imported lazily so that
`--backend openai` never imports torch models or vLLM."""
from __future__ import annotations

import argparse
import importlib

from core.errors import UserError

from benchmarks.backends.base import Backend, RequestRecord, RequestSpec

BACKENDS = {
    "openai": "benchmarks.backends.openai_http",  # /v1/completions, streaming
    "openai-chat": "benchmarks.backends.openai_http",  # /v1/chat/completions, streaming
    "vllm": "benchmarks.backends.vllm_offline",  # vLLM's LLM in process
    "hf": "benchmarks.backends.hf",  # transformers generate, static batches
    "ours": "benchmarks.backends.ours",  # our engine in process
}


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend named by args.backend, configured from the parsed command line."""
    if args.backend not in BACKENDS:
        raise UserError(f"unknown backend {args.backend!r} (choose from {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[args.backend]).from_args(args)


__all__ = ["BACKENDS", "Backend", "RequestRecord", "RequestSpec", "make_backend"]
