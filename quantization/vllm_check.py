"""Load an exported checkpoint in vLLM and answer a prompt greedily: the proof that the format is right.

    VLLM_CPU_KVCACHE_SPACE=1 python -m quantization.vllm_check /tmp/smollm2-awq
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from core.errors import UserError, cli


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.vllm_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="exported folder")
    parser.add_argument("--quantization", default="awq")
    parser.add_argument("--dtype", default="bfloat16", help="vLLM's AWQ path takes float16/bfloat16 activations")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise UserError(f"{args.model} is not a model folder")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(args.model), quantization=args.quantization, dtype=args.dtype,
              max_model_len=args.max_model_len, enforce_eager=True, seed=0)
    load_s = time.perf_counter() - t0
    messages = [{"role": "user", "content": args.prompt}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    text = out[0].outputs[0].text
    print(f"\nvLLM {args.quantization} {args.model} ({args.dtype}, loaded in {load_s:.0f} s)")
    print(f"  {args.prompt!r} -> {text!r}")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "quantization": args.quantization,
                                        "prompt": args.prompt, "text": text, "load_s": load_s}, indent=2))


if __name__ == "__main__":
    main()
