"""The engine loop in a process of its own, as vLLM runs its EngineCore: the server's Python never delays a step.

In async_engine.py the loop is a thread of the server process and shares the GIL with the event loop, which parses
requests, detokenizes and writes a server-sent event for every token of every stream. On a GPU, where a step of a
small model takes 2-3 ms, the step's own Python keeps waiting for its turn (measured on an H100, engines/README.md:
steps of 2.3-3.1 ms in one process, 4.9 ms per output token over HTTP at 16 req/s; 2.5 ms with this file). Here the
engine lives in a child process, and the two sides talk through two pipes:

    server process                                   engine process
    generate(), abort()  -- "add" | "abort" | "stop" -->  applies the commands between steps, runs step()
    reader thread        <-- "step": new tokens of every request, stats --

Only the new tokens of a step cross, for all its requests in one message; the server side keeps each request's list.
The child is spawned, not forked, so that CUDA starts clean in it, and it ignores Ctrl-C: the server stops it.
`ProcessLLMEngine` has AsyncLLMEngine's interface (start, generate, abort, shutdown, info, tokenizer, metrics), so
server.py serves from either.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing as mp
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import AsyncIterator

from core.errors import UserError
from core.generate import SamplingParams
from core.loading import load_tokenizer
from engines.ours.async_engine import EngineInfo, consume, put_threadsafe
from engines.ours.metrics import ServerMetrics
from engines.ours.outputs import RequestOutput
from engines.ours.sequence import RequestMetrics


class _Stream:
    """The server's side of one request: the tokens it has so far and the asyncio queue its outputs go to."""

    def __init__(self, prompt: list[int], loop: asyncio.AbstractEventLoop, params: SamplingParams):
        self.prompt, self.loop, self.queue = prompt, loop, asyncio.Queue()
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None  # as RequestOutput.logprobs
        self.metrics = RequestMetrics(time.perf_counter())  # perf_counter is system-wide: the child's stamps match


class ProcessLLMEngine:
    def __init__(self, engine_kwargs: dict, metrics: ServerMetrics | None = None):
        """Start a process running `LLMEngine(**engine_kwargs)`, and wait until it is loaded and warmed up.
        A start-up error in it is raised here, a UserError as a UserError."""
        self.metrics = metrics or ServerMetrics()
        ctx = mp.get_context("spawn")
        child_commands, self._commands = ctx.Pipe(duplex=False)  # (receiving end, sending end)
        self._outputs, child_outputs = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=run_engine_core, args=(engine_kwargs, child_commands, child_outputs),
                                    name="engine-core")
        self._process.start()
        child_commands.close()  # the child holds its own ends now; without ours, recv() sees EOF when it exits
        child_outputs.close()
        self._send_lock = threading.Lock()  # handlers and shutdown may send at the same time
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._outputs_ended = False  # set by the reader once the process's output pipe has closed
        try:
            first = self._receive()
        except BaseException:  # Ctrl-C while the model loads: do not leave the child behind
            self._process.terminate()
            raise
        if first is None or first[0] == "failed":
            self._process.join()
            if first is None:
                raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})")
            raise (UserError if first[2] else RuntimeError)(first[1])
        self.info: EngineInfo = first[1]
        self._reader = threading.Thread(target=self._read, name="engine-core-reader", daemon=True)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.info.tokenizer_dir)

    def start(self) -> None:
        self._reader.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._send(("stop",))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        if self._reader.is_alive():
            self._reader.join(timeout=5)

    @property
    def is_running(self) -> bool:
        # The flag first: a killed process closes its pipe a moment before is_alive() says it is gone, and the
        # reader thread lives on while it fails the open requests; /health must not answer 200 in between.
        return not self._outputs_ended and self._process.is_alive() and self._reader.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (each holds all tokens so far) until finished; see AsyncLLMEngine.generate."""
        stream = _Stream(list(prompt_token_ids), asyncio.get_running_loop(), params)
        self._streams[request_id] = stream
        if not self._send(("add", request_id, stream.prompt, params, stream.metrics.arrival_time)):
            self._streams.pop(request_id, None)
            raise RuntimeError("the engine process has stopped")
        async with contextlib.aclosing(consume(stream.queue, lambda: self.abort(request_id))) as stream_outputs:
            async for out in stream_outputs:
                yield out

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._send(("abort", request_id))

    def _send(self, message: tuple) -> bool:
        with self._send_lock:
            try:
                self._commands.send(message)
                return True
            except OSError:  # the process is gone (BrokenPipeError is an OSError)
                return False

    def _receive(self):
        try:
            return self._outputs.recv()
        except (EOFError, OSError):
            return None

    # --- the reader thread: hands each step's tokens to the waiting handlers -------------------------------------

    def _read(self) -> None:
        while (message := self._receive()) is not None:
            if message[0] == "step":
                _, results, stats = message
                outputs = []
                for request_id, new_tokens, new_logprobs, reason, text, metrics in results:
                    stream = self._streams.get(request_id)
                    if stream is None:
                        continue  # aborted meanwhile
                    stream.token_ids.extend(new_tokens)
                    if stream.logprobs is not None:
                        stream.logprobs.extend(new_logprobs)
                    out = RequestOutput(request_id, None, stream.prompt, list(stream.token_ids), text or "",
                                        reason is not None, reason, metrics or stream.metrics,
                                        None if stream.logprobs is None else list(stream.logprobs))
                    if out.finished:
                        self._streams.pop(request_id, None)
                    put_threadsafe(stream.loop, stream.queue, out)
                    outputs.append(out)
                self.metrics.record_step(outputs, stats)
            elif message[0] == "error":  # one request failed: a bad request (a UserError) or a failed step
                _, request_id, text, user_error = message
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    put_threadsafe(stream.loop, stream.queue, (UserError if user_error else RuntimeError)(text))
            else:  # "stats", sent when the engine goes idle
                self.metrics.record_stats(message[1])
        self._outputs_ended = True
        reason = "the server is shutting down" if self._stopping else \
            f"the engine process stopped (exit code {self._process.exitcode})"
        for request_id in list(self._streams):
            stream = self._streams.pop(request_id)
            put_threadsafe(stream.loop, stream.queue, RuntimeError(reason))


# --- the engine process --------------------------------------------------------------------------------------------

def run_engine_core(engine_kwargs: dict, commands: Connection, outputs: Connection) -> None:
    """The child's main: build and warm up the engine, then apply commands and step until told to stop (or until
    the server process is gone, which closes the command pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it sends "stop"
    from engines.ours.llm_engine import LLMEngine

    try:
        engine = LLMEngine(**engine_kwargs)
        engine.warm_up()
    except Exception as e:
        user_error = isinstance(e, UserError)
        outputs.send(("failed", str(e) if user_error else f"{type(e).__name__}: {e}", user_error))
        return
    outputs.send(("ready", EngineInfo.of(engine)))
    sent: dict[str, int] = {}  # request id -> how many of its output tokens the server has
    try:
        while True:
            if not engine.has_unfinished_requests():
                outputs.send(("stats", engine.stats()))
                commands.poll(None)  # sleep until the server sends something
            while commands.poll():
                command = commands.recv()
                if command[0] == "stop":
                    return
                if command[0] == "add":
                    _, request_id, prompt, params, arrival = command
                    try:
                        engine.add_request(request_id, prompt, params, arrival_time=arrival)
                        sent[request_id] = 0
                    except Exception as e:
                        outputs.send(("error", request_id, str(e), isinstance(e, UserError)))
                else:  # "abort": the client went away; its blocks go back to the pool now
                    engine.abort(command[1])
                    sent.pop(command[1], None)
            if not engine.has_unfinished_requests():
                continue
            try:
                step = engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                for request_id in sent:
                    engine.abort(request_id)
                    outputs.send(("error", request_id, f"engine step failed: {type(e).__name__}: {e}", False))
                sent.clear()
                continue
            results = []
            for out in step:
                new_tokens = out.token_ids[sent[out.request_id]:]
                new_logprobs = None if out.logprobs is None else out.logprobs[sent[out.request_id]:]
                if out.finished:
                    del sent[out.request_id]
                    results.append((out.request_id, new_tokens, new_logprobs, out.finish_reason, out.text,
                                    out.metrics))
                else:
                    sent[out.request_id] = len(out.token_ids)
                    results.append((out.request_id, new_tokens, new_logprobs, None, None, None))
            outputs.send(("step", results, engine.stats()))
    except (EOFError, OSError):
        return  # the server process is gone
