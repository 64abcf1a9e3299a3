"""The engine loop behind the server: one thread steps `LLMEngine`, asyncio request handlers talk to it by queues.

The engine is not thread-safe and need not be: only the loop thread ever touches it. A handler puts an "add" or
"abort" command on the command queue and wakes the loop; the loop applies every pending command between two steps
(so a new request joins the very next forward pass: continuous batching), runs a step, and hands each output to
the asyncio queue of its request with `call_soon_threadsafe`. The forward pass releases the GIL in PyTorch's
kernels, so the event loop keeps accepting connections and streaming tokens while the model runs. But the rest of
a step (scheduling, building its inputs, reading the sampled tokens) is Python that needs the GIL, and so is every
token the event loop detokenizes and streams: with many streams, each step waits its turn. engine_core.py runs the
same loop in a process of its own, as vLLM does; `python -m engines.ours.server` uses that one unless told otherwise.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from core.generate import SamplingParams
from engines.ours.llm_engine import LLMEngine
from engines.ours.metrics import ServerMetrics
from engines.ours.outputs import RequestOutput


@dataclass
class EngineInfo:
    """What the server needs to know about the engine behind it (engine_core.py sends it across processes)."""
    label: str
    model_root: str             # /v1/models' "root": the weights' folder, or the model's name
    tokenizer_dir: Path | None  # None: the default model's tokenizer
    max_model_len: int
    vocab_size: int
    stats: dict                 # LLMEngine.stats() once warmed up

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineInfo:
        lm = engine.lm
        return cls(engine.label, str(lm.path or lm.name), lm.tokenizer_dir, engine.max_model_len,
                   lm.model.config.vocab_size, engine.stats())


async def consume(outputs: asyncio.Queue, abort: Callable[[], None]) -> AsyncIterator[RequestOutput]:
    """Yield a request's outputs from its queue until the finished one; an exception put there is raised. Closing
    the generator before that (the client went away, a stop string matched) calls `abort`."""
    finished = False
    try:
        while True:
            item = await outputs.get()
            if isinstance(item, BaseException):
                finished = True  # the engine has already dropped it
                raise item
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        if not finished:
            abort()


def put_threadsafe(loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, item) -> None:
    """Hand `item` to a request's queue from a thread that is not the event loop's."""
    try:
        loop.call_soon_threadsafe(outputs.put_nowait, item)
    except RuntimeError:
        pass  # the event loop is closed: the server is shutting down


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.info = EngineInfo.of(engine)
        self.metrics = metrics or ServerMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # request id -> (event loop, asyncio.Queue) of the handler waiting for it; touched by the loop thread only.
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as the engine makes them (each holds all tokens so far) until finished.

        Closing the generator early (the client went away, a stop string matched) aborts the request, which hands
        its KV blocks back to the pool. Errors from the engine (a bad request, a failed step) are raised here.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", request_id, prompt_token_ids, params, time.perf_counter(), loop, outputs))
        self._wake.set()
        async with contextlib.aclosing(consume(outputs, lambda: self.abort(request_id))) as stream_outputs:
            async for out in stream_outputs:
                yield out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # --- the loop thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self.metrics.record_stats(self.engine.stats())
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out, out.finished)
            self.metrics.record_step(outputs, self.engine.stats())
        self._fail_all(RuntimeError("the server is shutting down"))

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params, arrival, loop, outputs = command
                self._streams[request_id] = (loop, outputs)
                try:
                    self.engine.add_request(request_id, prompt, params, arrival_time=arrival)
                except Exception as e:  # UserError for a bad request: the handler turns it into a 400
                    self._deliver(request_id, e, True)
            else:
                self._streams.pop(command[1], None)
                self.engine.abort(command[1])

    def _deliver(self, request_id: str, item, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is None:
            return  # aborted meanwhile
        put_threadsafe(*target, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._deliver(request_id, error, True)
