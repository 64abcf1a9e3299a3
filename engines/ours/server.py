"""An OpenAI-compatible server for our engine: the API vLLM serves, so every client and benchmark works unchanged.

    python -m engines.ours.server --model smollm2-135m --max-num-seqs 16 --max-model-len 2048 --port 8000

Endpoints: POST /v1/completions and /v1/chat/completions (streaming as server-sent events ending in
`data: [DONE]`, or one JSON answer; `usage` in both), GET /v1/models, /health and /metrics (Prometheus).
Each request is tokenized here, handed to the engine loop, which runs in a process of its own (engine_core.py) or,
with `--engine-core thread`, in a thread of this one (async_engine.py), and detokenized incrementally as tokens
come back. A client that disconnects has its request aborted, which frees its KV blocks at once.
Bad requests get a 400 with an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from core.errors import UserError, cli
from core.generate import SamplingParams
from engines.ours.async_engine import AsyncLLMEngine
from engines.ours.engine_core import ProcessLLMEngine
from engines.ours.llm_engine import MAX_LOGPROBS
from engines.ours.outputs import RequestOutput

MAX_CHOICES = 16  # n: choices per request, each an engine request of its own


# --- request bodies (the OpenAI fields we honour, plus vLLM's extras top_k, ignore_eos, stop_token_ids) ----------

class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = 0  # vLLM: 0 or -1 means off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top tokens per position, besides the chosen one
    echo: bool = False  # not supported: refused rather than ignored


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class BadRequest(Exception):
    """Turned into a 400 with an OpenAI-style error body."""


def error_body(message: str, code: int = 400, kind: str = "BadRequestError") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(message: str, code: int = 400, kind: str = "BadRequestError") -> JSONResponse:
    return JSONResponse(error_body(message, code, kind), status_code=code)


# --- detokenization ------------------------------------------------------------------------------------------

class IncrementalDetokenizer:
    """Text pieces of a growing list of output tokens, never splitting a multi-byte character.

    Decoding the whole output at every token costs O(n^2); decoding only the new token loses what depends on its
    neighbours (byte-level BPE splits characters across tokens). So each step decodes a short window: the tokens
    since the last emitted piece, with the piece before them as context, and emits the difference, holding it back
    while it ends in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0    # tokens before this were emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, token_ids: list[int]) -> str:
        """token_ids: all output tokens so far. Returns the new text (may be empty)."""
        before = self._decode(token_ids[self.prefix_offset:self.read_offset])
        after = self._decode(token_ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        delta = after[len(before):]
        self.text += delta
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the text once the request ends (`final_text` is the engine's full decode)."""
        delta = final_text[len(self.text):]
        self.text = final_text
        return delta


# --- the server ----------------------------------------------------------------------------------------------

class OpenAIServing:
    """The request handling shared by both endpoints: validate, tokenize, run, detokenize, apply stop strings."""

    def __init__(self, engine: AsyncLLMEngine | ProcessLLMEngine, served_model_name: str):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served_model_name = served_model_name
        self.max_model_len = engine.info.max_model_len

    def check_model(self, body: SamplingFields) -> None:
        if body.model is not None and body.model != self.served_model_name:
            raise BadRequest(f"The model `{body.model}` does not exist; this server serves "
                             f"`{self.served_model_name}` (see /v1/models).")

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        if body.echo:
            raise BadRequest("echo (the prompt and its logprobs in the answer) is not supported")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise BadRequest("send one prompt per request (a batch of prompts is not supported)")
            prompt = prompt[0]
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        vocab = self.engine.info.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"prompt token ids must lie in [0, {vocab})")
        return ids

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                part.get("text", "") for part in m.content if part.get("type") == "text")
            messages.append({"role": m.role, "content": content or ""})
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def sampling_params(self, body: SamplingFields, prompt_len: int, max_tokens: int | None,
                        logprobs: int | None = None) -> SamplingParams:
        if prompt_len == 0:
            raise BadRequest("the prompt is empty")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise BadRequest(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                             f"prompt has {prompt_len} tokens, which leaves no room for output.")
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1")
        if max_tokens > room:
            raise BadRequest(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                             f"{max_tokens} for the completion).")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                              top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos,
                              stop_token_ids=list(body.stop_token_ids), logprobs=logprobs)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, out: RequestOutput, start: int, text_offset: int) -> dict:
        """The legacy completions format for output tokens start.. : parallel lists, top tokens as {text: logprob}.
        text_offset: where the first of them starts in the completion's text."""
        tokens, offsets = [], []
        for token_id in out.token_ids[start:]:
            offsets.append(text_offset)
            tokens.append(self.token_text(token_id))
            text_offset += len(tokens[-1])
        entries = out.logprobs[start:]
        return {"tokens": tokens, "token_logprobs": [chosen for chosen, _ in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in top} for _, top in entries],
                "text_offset": offsets}

    def chat_logprobs(self, out: RequestOutput, start: int) -> dict:
        """The chat format for output tokens start.. : one entry per token, with its text's UTF-8 bytes."""
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**entry(t, chosen), "top_logprobs": [entry(i, lp) for i, lp in top]}
                            for t, (chosen, top) in zip(out.token_ids[start:], out.logprobs[start:])]}

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams, stop: list[str]
                  ) -> AsyncIterator[tuple[str, RequestOutput, str | None]]:
        """Yield (new text, output, finish reason or None) per engine output. A matched stop string ends the
        request early (the stream is closed, which aborts it in the engine) and is cut from the text."""
        detok = IncrementalDetokenizer(self.tokenizer)
        async with contextlib.aclosing(self.engine.generate(request_id, prompt, params)) as outputs:
            async for out in outputs:
                seen = len(detok.text)
                delta = detok.finish(out.text) if out.finished else detok.step(out.token_ids)
                reason = out.finish_reason if out.finished else None
                if stop and delta:
                    cut = min((i for i in (detok.text.find(s, max(seen - len(s) + 1, 0)) for s in stop) if i >= 0),
                              default=-1)
                    if cut >= 0:
                        delta, detok.text, reason = detok.text[seen:cut], detok.text[:cut], "stop"
                yield delta, out, reason
                if reason is not None:
                    return


def usage(outs: list[RequestOutput]) -> dict:
    """One request's usage: its prompt once, the tokens of all its choices."""
    n_in, n_out = len(outs[0].prompt_token_ids), sum(len(out.token_ids) for out in outs)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


async def interleave(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """The items of several async iterators as they come, each with its iterator's index (one request's choices).
    An exception in one is raised here; closing this generator closes them all (aborting their engine requests)."""
    items: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await items.put((i, item))
        except Exception as e:
            await items.put((i, e))
        finally:
            await items.put((i, done))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await items.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def cancel_on_disconnect(request: Request, work) -> object | None:
    """Await `work`, but cancel it (aborting its request) if the client disconnects first; None then."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None


def build_app(engine: AsyncLLMEngine | ProcessLLMEngine, served_model_name: str) -> FastAPI:
    """The FastAPI app. It starts the engine loop on start-up and stops it on shut-down."""
    serving = OpenAIServing(engine, served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="llmip server", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            return error_response("the request body is not valid JSON")
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(f"invalid request: {problems}")

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest):
        return error_response(str(exc))

    @app.exception_handler(UserError)
    async def user_error(_request: Request, exc: UserError):
        return error_response(str(exc))

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return error_response("the engine loop has stopped", 503, "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": int(time.time()), "owned_by": "llmip",
            "root": engine.info.model_root, "max_model_len": serving.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def respond(request: Request, body: SamplingFields, prompt: list[int], max_tokens: int | None,
                      chat: bool, logprobs: int | None):
        """logprobs: top tokens to report per output token (0: only the chosen one's), None: no logprobs.
        n > 1 runs n engine requests on the same prompt (prefix caching shares its blocks), one per choice; with a
        seed, choice i samples with seed + i."""
        params = serving.sampling_params(body, len(prompt), max_tokens, logprobs)
        choice_params = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                         for i in range(body.n)]

        def choice_logprobs(out: RequestOutput, start: int, text_offset: int) -> dict | None:
            if logprobs is None:
                return None
            return serving.chat_logprobs(out, start) if chat else serving.completion_logprobs(out, start, text_offset)

        stop = [s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s]
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": served_model_name}

        def run(i: int) -> AsyncIterator[tuple[str, RequestOutput, str | None]]:
            return serving.run(f"{request_id}-{i}", prompt, choice_params[i], stop)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                n = body.n
                # Per choice: its last output, and the tokens and text that its earlier chunks covered.
                last, reported, text_len = [None] * n, [0] * n, [0] * n
                try:
                    async for i, (delta, out, reason) in interleave([run(i) for i in range(n)]):
                        last[i] = out
                        if not delta and reason is None:
                            continue  # nothing printable yet (a partial character): its tokens go with the next
                        lp = choice_logprobs(out, reported[i], text_len[i])
                        first = reported[i] == 0  # this choice's first chunk
                        reported[i], text_len[i] = len(out.token_ids), text_len[i] + len(delta)
                        if chat:
                            message = {"role": "assistant", "content": delta} if first else {"content": delta}
                            choice = {"index": i, "delta": message, "logprobs": lp, "finish_reason": reason}
                        else:
                            choice = {"index": i, "text": delta, "logprobs": lp, "finish_reason": reason}
                        yield sse({**head, "choices": [choice]})
                except Exception as e:  # the status line is sent already: report in the stream
                    yield sse(error_body(str(e), 500, "InternalServerError"))
                    yield sse("[DONE]")
                    return
                if include_usage and None not in last:
                    yield sse({**head, "choices": [], "usage": usage(last)})
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")

        async def collect(i: int):
            pieces, last, reason = [], None, None
            async for delta, last, reason in run(i):
                pieces.append(delta)
            return "".join(pieces), last, reason

        results = await cancel_on_disconnect(request, asyncio.gather(*(collect(i) for i in range(body.n))))
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        choices = []
        for i, (text, out, reason) in enumerate(results):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": choice_logprobs(out, 0, 0), "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": choice_logprobs(out, 0, 0),
                                "finish_reason": reason})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage([out for _, out, _ in results])}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        serving.check_model(body)
        return await respond(request, body, serving.completion_prompt(body), body.max_tokens, chat=False,
                             logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        serving.check_model(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(request, body, serving.chat_prompt(body), max_tokens, chat=True, logprobs=logprobs)

    return app


@cli
def main(argv: list[str] | None = None) -> None:
    from core.__main__ import add_model_args

    parser = argparse.ArgumentParser(prog="python -m engines.ours.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the name clients send (default: --model)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most requests in the running batch")
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="GPU: share of device memory for weights, activations and the KV cache")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None,
                        help="KV-cache size in GiB (default on CPU: 1, like VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV-cache blocks, outright")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: keys and values stored in 8 bits (twice the tokens per GiB)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs, no torch.compile")
    parser.add_argument("--engine-core", choices=("process", "thread"), default="process",
                        help="where the engine loop runs: its own process (like vLLM) or a thread of the server")
    parser.add_argument("--uvicorn-log-level", default="info")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UserError("--gpu-memory-utilization must be in (0, 1]")
    if not 0 < args.port < 65536:
        raise UserError("--port must be in 1..65535")

    import uvicorn

    engine_kwargs = dict(model=args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                         random_weights=args.random_weights, max_num_seqs=args.max_num_seqs,
                         max_model_len=args.max_model_len, block_size=args.block_size,
                         num_kv_blocks=args.num_gpu_blocks_override, kv_cache_memory_gb=args.kv_cache_memory_gb,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                         kv_cache_dtype=args.kv_cache_dtype)
    if args.engine_core == "process":
        engine = ProcessLLMEngine(engine_kwargs)  # loads and warms up the engine in its process
    else:
        from engines.ours.llm_engine import LLMEngine

        llm = LLMEngine(**engine_kwargs)
        llm.warm_up()  # compile before the first request, not during it
        engine = AsyncLLMEngine(llm)
    name = args.served_model_name or args.model
    info = engine.info
    print(f"serving {info.label} as {name!r} on http://{args.host}:{args.port} (engine in a {args.engine_core}): "
          f"max_model_len {info.max_model_len}, max_num_seqs {args.max_num_seqs}, {info.stats['num_blocks']} KV "
          f"blocks of {args.block_size} tokens", flush=True)
    try:
        uvicorn.run(build_app(engine, name), host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    access_log=not args.disable_uvicorn_access_log)
    finally:  # also when uvicorn never started (port taken): an engine process left behind would hang the exit
        engine.shutdown()


if __name__ == "__main__":
    main()
