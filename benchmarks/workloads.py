"""Workloads: lists of RequestSpec, all seeded and reproducible.

- sharegpt: real prompts and reply lengths from ShareGPT (core.data; the evaluation split by default).
- random: text windows of random length: input ~ U[L(1-r), L(1+r)], output ~ U[O(1-r), O(1+r)] (vLLM's
  --random-range-ratio), cut from ShareGPT text so prompts read like language.
- fixed: every prompt exactly --random-input-len tokens, every output --random-output-len tokens.
- prefix: --num-prefixes shared prefixes of --prefix-len tokens, each request one of them plus its own suffix of
  --random-input-len tokens (prefix caching workloads).
Lengths are in tokens of the given tokenizer. Text windows are re-encoded after decoding, so prompt_len is the
length the model really sees. save_workload/load_workload carry a workload as JSON to a machine without the
ShareGPT package (the lent GPU), which then serves exactly the same requests.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import asdict
from pathlib import Path

from core.data import plain_text, sharegpt_requests
from core.errors import UserError

from benchmarks.backends.base import RequestSpec

DATASETS = ("sharegpt", "random", "fixed", "prefix")


@functools.lru_cache(maxsize=2)
def _corpus_ids(tokenizer, split: str = "evaluation") -> tuple[int, ...]:
    return tuple(tokenizer(plain_text(split, max_chars=400_000)).input_ids)


def _window(tokenizer, rng: random.Random, length: int) -> tuple[str, int]:
    """A random window of about `length` tokens of ShareGPT text; returns (text, its re-encoded token count)."""
    ids = _corpus_ids(tokenizer)
    if length >= len(ids):
        raise UserError(f"input length {length} exceeds the text corpus ({len(ids)} tokens)")
    start = rng.randrange(0, len(ids) - length)
    text = tokenizer.decode(ids[start:start + length])
    return text, len(tokenizer(text).input_ids)


def _lengths(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def build_workload(tokenizer, dataset: str, num_prompts: int, seed: int = 0, *, input_len: int = 128,
                   output_len: int | None = None, range_ratio: float = 0.0, max_input_len: int = 1024,
                   prefix_len: int = 256, num_prefixes: int = 1, ignore_eos: bool = True,
                   sharegpt_split: str = "evaluation") -> list[RequestSpec]:
    """num_prompts RequestSpecs of the named dataset. output_len: tokens per request (required except for
    sharegpt, where it overrides the real reply length); ignore_eos makes backends produce exactly that many."""
    if num_prompts < 1:
        raise UserError("--num-prompts must be at least 1")
    if not 0 <= range_ratio < 1:
        raise UserError("--random-range-ratio must be in [0, 1)")
    rng = random.Random(seed)
    if dataset == "sharegpt":
        reqs = sharegpt_requests(tokenizer, num_prompts, split=sharegpt_split, seed=seed,
                                 max_input_len=max_input_len, output_len=output_len)
        return [RequestSpec(r.prompt, r.prompt_len, r.output_len, ignore_eos) for r in reqs]
    if output_len is None or output_len < 1 or input_len < 1:
        raise UserError(f"dataset {dataset} needs positive --random-input-len and --random-output-len")
    if dataset == "fixed":
        range_ratio = 0.0
    if dataset in ("random", "fixed"):
        ins, outs = _lengths(rng, num_prompts, input_len, range_ratio), _lengths(rng, num_prompts, output_len,
                                                                                 range_ratio)
        return [RequestSpec(*_window(tokenizer, rng, i), o, ignore_eos) for i, o in zip(ins, outs)]
    if dataset == "prefix":
        if num_prefixes < 1 or prefix_len < 1:
            raise UserError("--prefix-len and --num-prefixes must be positive")
        prefixes = [_window(tokenizer, rng, prefix_len)[0] for _ in range(num_prefixes)]
        specs = []
        for i in range(num_prompts):
            text = prefixes[i % num_prefixes] + "\n\n" + _window(tokenizer, rng, input_len)[0]
            specs.append(RequestSpec(text, len(tokenizer(text).input_ids), output_len, ignore_eos))
        return specs
    raise UserError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")


def save_workload(path: Path, specs: list[RequestSpec]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(s) for s in specs]))


def load_workload(path: Path, num_prompts: int) -> list[RequestSpec]:
    """The first num_prompts requests of a file written by save_workload."""
    try:
        specs = [RequestSpec(**r) for r in json.loads(Path(path).read_text())][:num_prompts]
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot read a workload from {path}: {e}") from None
    if len(specs) < num_prompts:
        raise UserError(f"{path} holds {len(specs)} requests, fewer than --num-prompts {num_prompts}")
    return specs
