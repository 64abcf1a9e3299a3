"""vLLM's own speculative decoding (`speculative_config`) on the benchmark's prompts, batch 1, greedy.

Runs vLLM with no speculation, then with each method, one engine per method in its own process (an engine's
memory is only given back when its process ends), on the same ShareGPT prompts as `speculative.benchmark`, one
request at a time. Methods:
- ngram: vLLM's prompt lookup (`prompt_lookup_min/max`), no second model;
- draft: a draft model, by default the same shallow draft `speculative.draft` cuts from the target (its layers
  written out as a Hugging Face folder, so vLLM loads it like any small checkpoint), or `--draft-model DIR`;
- medusa: our trained Medusa heads (speculative/heads/), exported to vLLM's Medusa checkpoint format. vLLM
  proposes a single chain from each head's top-1 token (no tree), so it accepts fewer tokens than ours.
Reports tokens/s, speed-up over vLLM without speculation, whether the greedy tokens equal that baseline, and vLLM's
acceptance counters (mean accepted tokens per step, acceptance rate per position).

    VLLM_CPU_KVCACHE_SPACE=1 python -m speculative.vllm_spec --methods ngram,draft     # CPU build, a few minutes
    python -m speculative.vllm_spec --methods ngram,draft,medusa --num-prompts 8 --max-tokens 256   # GPU, vllm-kit
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from benchmarks.results import machine_info
from core.errors import UserError, cli
from core.loading import find_model_dir, load_model
from core.model import Transformer
from speculative.benchmark import load_prompts
from speculative.draft import parse_layers
from speculative.medusa import MedusaHeads, default_heads_path, load_heads

METHODS = ("none", "ngram", "draft", "medusa")


def export_shallow_draft(target_dir: Path, layers: list[int], out: Path) -> Path:
    """Write target layers `layers` (renumbered 0..n-1) with the embedding, final norm and LM head as an HF folder."""
    from safetensors.torch import load_file, save_file

    config = json.loads((target_dir / "config.json").read_text())
    config["num_hidden_layers"] = len(layers)
    state = {}
    for f in sorted(target_dir.glob("*.safetensors")):
        state.update(load_file(f))
    new_index = {old: new for new, old in enumerate(layers)}
    draft = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            old = int(name.split(".")[2])
            if old not in new_index:
                continue
            name = name.replace(f"model.layers.{old}.", f"model.layers.{new_index[old]}.", 1)
        draft[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(draft, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in target_dir.iterdir():  # the tokenizer files: vLLM checks the draft's vocabulary against the target's
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def export_medusa(heads: MedusaHeads, model: Transformer, out: Path) -> Path:
    """Our heads (residual block, shared LM head) as vLLM's MedusaModel folder: one LM head copy per head."""
    from safetensors.torch import save_file

    if heads.token_conditioned:
        raise UserError("vLLM's Medusa heads read the hidden state alone: token-conditioned heads cannot be exported")
    cfg = model.config
    tensors = {}
    for i, block in enumerate(heads.blocks):
        tensors[f"blocks.{i}.layers.0.weight"] = block.weight.detach().float().contiguous()
        tensors[f"blocks.{i}.layers.0.bias"] = block.bias.detach().float().contiguous()
        tensors[f"lm_heads.{i}.weight"] = model.lm_head.weight.detach().float().clone().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size, "num_heads": len(heads.blocks), "num_hidden_layers": 1,
        "medusa_fc_bias": True, "torch_dtype": "float32"}, indent=2))
    return out


def run_engine(model_dir: str, speculative_config: dict | None, prompts: list[str], max_tokens: int,
               dtype: str, max_model_len: int, enforce_eager: bool) -> dict:
    """One vLLM engine, the prompts one at a time (batch 1). Runs in its own process."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager, seed=0,
              speculative_config=speculative_config, disable_log_stats=False, max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=False)
    llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    before = metrics(llm)
    tokens, seconds = [], []
    for text in prompts:
        t0 = time.perf_counter()
        out = llm.chat([{"role": "user", "content": text}], params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        tokens.append(list(out[0].outputs[0].token_ids))
    after = metrics(llm)
    llm.llm_engine.engine_core.shutdown()  # else this process waits forever for its engine process at exit
    delta = {k: after[k] - before.get(k, 0) for k in after if not k.startswith("pos")}
    per_pos = [after[k] - before.get(k, 0) for k in sorted((k for k in after if k.startswith("pos")),
                                                           key=lambda k: int(k[3:]))]
    return {"tokens": tokens, "seconds": seconds, **delta, "accepted_per_pos": per_pos}


def metrics(llm) -> dict[str, float]:
    """vLLM's speculative counters: num_drafts, num_draft_tokens, num_accepted_tokens, posN (accepted at N)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:spec_decode_")
        if name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            out[name] = out.get(name, 0) + m.value
        elif name == "num_accepted_tokens_per_pos":
            for i, v in enumerate(m.values):
                out[f"pos{i}"] = out.get(f"pos{i}", 0) + v
    return out


def _child(queue, *args) -> None:
    try:
        queue.put(run_engine(*args))
    except BaseException as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_isolated_engine(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=2.0)
            break
        except Exception:  # queue.Empty
            if not proc.is_alive():
                result = {"error": f"engine process died (exit code {proc.exitcode})"}
                break
    proc.join(timeout=60)
    if proc.is_alive():  # the result is in hand: do not let a lingering engine hold the next one up
        proc.terminate()
        proc.join()
    return result


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registry name or Hugging Face folder")
    parser.add_argument("--methods", default="ngram,draft", help=f"comma-separated, from {', '.join(METHODS[1:])}")
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts per kind (chat, code, edit)")
    parser.add_argument("--prompts", default=None, help="prompts JSON (default: ShareGPT evaluation split)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=3)
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--draft-model", default=None, help="a draft checkpoint folder (default: a shallow draft)")
    parser.add_argument("--draft-layers", default="0-7,18-29", help="shallow draft layers (as benchmark.py)")
    parser.add_argument("--heads", default=None, help="Medusa heads file (default: the committed ones)")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs")
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in METHODS[1:]]:
        raise UserError(f"unknown method(s) {', '.join(bad)} (choose from {', '.join(METHODS[1:])})")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    model_dir = find_model_dir(args.model)
    kinds = load_prompts(args.prompts, args.num_prompts)
    work = [(kind, text) for kind, texts in kinds.items() for text in texts]
    texts = [text for _, text in work]
    tmp = Path(tempfile.mkdtemp(prefix="llmip-vllm-spec-"))
    k = args.num_speculative_tokens
    configs: dict[str, dict | None] = {"none": None}
    for m in methods:
        if m == "ngram":
            configs["ngram"] = {"method": "ngram", "num_speculative_tokens": k,
                                "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min}
        elif m == "draft":
            if args.draft_model:
                draft_dir = str(find_model_dir(args.draft_model))
            else:
                num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
                draft_dir = str(export_shallow_draft(model_dir, parse_layers(args.draft_layers, num_layers),
                                                     tmp / "draft"))
            configs["draft"] = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": k}
        elif m == "medusa":
            lm = load_model(args.model, "cpu", "float32")
            heads = load_heads(args.heads or default_heads_path(lm.name), lm.model)
            configs["medusa"] = {"method": "medusa", "model": str(export_medusa(heads, lm.model, tmp / "medusa")),
                                 # vLLM drafts one token per head
                                 "num_speculative_tokens": min(k, len(heads.blocks))}

    device = "cuda" if torch.cuda.is_available() else "cpu"
    header = {"model": args.model, "engine": "vllm", "device": device, "dtype": dtype, "max_tokens": args.max_tokens,
              "num_speculative_tokens": k, "prompts": "ShareGPT evaluation split" if not args.prompts else args.prompts,
              "enforce_eager": args.enforce_eager, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine_info()}
    results = {}
    for name, spec in configs.items():
        print(f"vLLM, speculative method: {name} ...", flush=True)
        results[name] = run_isolated_engine(str(model_dir), spec, texts, args.max_tokens, dtype,
                                            args.max_model_len, args.enforce_eager)
        if "error" in results[name]:
            print(f"  failed: {results[name]['error']}")
        if name == "none" and "error" in results[name]:
            raise UserError(f"vLLM without speculation failed: {results[name]['error']}")
        report = {**header, **summarize(results, work, kinds)}
        if args.out:  # after every engine: a run cut short still leaves the methods it finished
            Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\nvLLM, {args.model} [trained weights, {dtype}, {device}], batch 1, greedy, {args.max_tokens} new tokens, "
          f"k={k}, {len(texts)} prompts ({', '.join(kinds)})")
    head = f"{'kind':<6}{'method':<10}{'tok/s':>8}{'speed-up':>9}{'same as no speculation':>24}"
    print(head + "\n" + "-" * len(head))
    for kind in kinds:
        for name, row in report["results"][kind].items():
            if "error" in row:
                continue
            print(f"{kind:<6}{name:<10}{row['output_throughput']:>8.1f}{row['speedup']:>8.2f}x"
                  f"{'yes' if row['identical_to_plain'] else 'NO':>24}")
    print("\nvLLM's acceptance counters over all prompts:")
    for name, row in report["results"].get("all", {}).items():
        print(f"  {name:<8} {row['mean_accepted_tokens_per_step']:.2f} tokens per step, acceptance per position "
              + " ".join(f"{a:.2f}" for a in row["acceptance_rate_per_pos"]))
    if args.out:
        print(f"JSON: {args.out}")


def summarize(results: dict[str, dict], work: list[tuple[str, str]], kinds: Iterable[str]) -> dict:
    """Per kind and method: tokens/s, speed-up over no speculation, greedy identity; vLLM's counters over all."""
    base = results["none"]
    out: dict = {"results": {}}
    for kind in kinds:
        idx = [i for i, (kd, _) in enumerate(work) if kd == kind]
        base_s = sum(base["seconds"][i] for i in idx)
        for name, r in results.items():
            if "error" in r:
                out["results"].setdefault(kind, {})[name] = {"error": r["error"]}
                continue
            s = sum(r["seconds"][i] for i in idx)
            n = sum(len(r["tokens"][i]) for i in idx)
            out["results"].setdefault(kind, {})[name] = {
                "output_throughput": n / s, "speedup": base_s / s,
                "identical_to_plain": all(r["tokens"][i] == base["tokens"][i] for i in idx)}
    for name, r in results.items():
        if name == "none" or "error" in r or not r.get("num_drafts"):
            continue
        out["results"].setdefault("all", {})[name] = {
            "mean_accepted_tokens_per_step": 1 + r["num_accepted_tokens"] / r["num_drafts"],
            "acceptance_rate_per_pos": [a / r["num_drafts"] for a in r["accepted_per_pos"]],
            "draft_acceptance_rate": r["num_accepted_tokens"] / max(r["num_draft_tokens"], 1)}
    return out


if __name__ == "__main__":
    main()
