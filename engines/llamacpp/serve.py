"""llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on the default model's GGUF, queried with the
openai client and driven by our harness: engines/vllm/serve.py with `--engines llamacpp` (add `,ours` or `,vllm`
to compare on the same workload). Options are that script's and the harness's.

    pip install 'llama-cpp-python[server]'
    python -m engines.llamacpp.serve --num-prompts 16 --request-rate 1
"""
from __future__ import annotations

import sys

from engines.vllm.serve import main as serve_main


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    return serve_main(argv if any(a.startswith("--engines") for a in argv) else ["--engines", "llamacpp", *argv])


if __name__ == "__main__":
    main()
