"""TensorRT-LLM's `LLM` API: the same chat questions as engines/vllm/offline.py, then an offline throughput run.

For readers with an NVIDIA GPU and TensorRT-LLM installed (pip install tensorrt_llm, or NVIDIA's container); not
run in this repository's CI or on its CPU machine. The API mirrors vLLM's: `LLM(model=..., tensor_parallel_size=...)`,
`SamplingParams(max_tokens=..., temperature=...)`, `llm.generate(prompts, params)` returning outputs with
`.outputs[0].text` and `.token_ids`. Its server, `trtllm-serve MODEL --port 8000`, speaks the OpenAI API, so
`python -m benchmarks run --backend openai --base-url http://127.0.0.1:8000 ...` drives it like the others.

    python -m engines.tensorrt_llm.generate --model /path/to/hf-folder
    python -m engines.tensorrt_llm.generate --model /path/to/hf-folder --num-requests 1000 --input-len 256 \\
        --output-len 256 --tensor-parallel-size 2
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from core.errors import UserError, cli

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a KV cache is in one sentence.", "List three primary colors."]


@cli
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m engines.tensorrt_llm.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registry name, Hugging Face folder or hub id")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-tokens", type=int, default=64, help="per chat answer")
    parser.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=0.9,
                        help="share of the GPU memory left after the weights that the KV cache takes")
    parser.add_argument("--num-requests", type=int, default=0, help="throughput run: random-token prompts")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256, help="exact (ignore_eos)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tensor_parallel_size < 1 or args.max_tokens < 1 or args.num_requests < 0:
        raise UserError("--tensor-parallel-size and --max-tokens must be >= 1, --num-requests >= 0")
    try:
        import tensorrt_llm
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
    except ImportError:
        raise UserError("TensorRT-LLM is not installed (it needs an NVIDIA GPU: pip install tensorrt_llm, or "
                        "NVIDIA's TensorRT-LLM container); this script was not run in this repository") from None
    from core.loading import find_model_dir

    model = str(find_model_dir(args.model))
    t0 = time.perf_counter()
    llm = LLM(model=model, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
              kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction))
    load_s = time.perf_counter() - t0
    tokenizer = llm.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in QUESTIONS]
    answers = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    print(f"\nTensorRT-LLM {tensorrt_llm.__version__}: {args.model} [trained weights, "
          f"{args.dtype}], tensor_parallel_size {args.tensor_parallel_size}, loaded in {load_s:.0f} s")
    for q, a in zip(QUESTIONS, answers):
        print(f"  {q!r} -> {a.outputs[0].text[:80]!r}")
    result = {"model": model, "tensor_parallel_size": args.tensor_parallel_size, "load_s": load_s,
              "answers": [a.outputs[0].text for a in answers]}

    if args.num_requests:
        rng = random.Random(0)
        vocab = tokenizer.vocab_size
        token_prompts = [[rng.randrange(10, vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(token_prompts, params)
        wall = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"{args.num_requests} requests x ({args.input_len} prompt + {args.output_len} output tokens), "
              f"offline: {n_out / wall:.0f} output tok/s, {args.num_requests / wall:.2f} req/s, {wall:.1f} s")
        result |= {"num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
                   "output_throughput": n_out / wall, "request_throughput": args.num_requests / wall,
                   "duration": wall}
    llm.shutdown()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
