"""Any OpenAI-compatible server (vLLM's, llama.cpp's, ours) over HTTP: /v1/completions or /v1/chat/completions,
streaming with usage, timed exactly as vLLM's benchmark client does.

The clock starts just before the POST. Every SSE chunk with a `choices` entry is a token arrival: the first sets
TTFT, each later one adds an ITL gap; E2EL is the last chunk's time. The output token count is the server's
`usage.completion_tokens` when sent, else the number of chunks. A non-200 status, a timeout, a stream that ends
without `[DONE]` or a connection error is a failed record with the reason, never an exception.

With --server-metrics, a sampler polls the server's Prometheus /metrics every second for KV-cache usage (vLLM
exports `vllm:kv_cache_usage_perc`); with --server-pid it samples the RSS of that process tree on this machine.
Both are off by default, so the client adds no load of its own to the server or the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

from core.errors import UserError

from benchmarks.backends.base import Backend, RequestRecord, RequestSpec

KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


class OpenAIBackend(Backend):
    online = True

    def __init__(self, base_url: str, model: str, chat: bool = False, endpoint: str | None = None,
                 timeout_s: float = 600.0, server_pid: int | None = None, server_metrics: bool = False,
                 temperature: float = 0.0):
        self.name = "openai-chat" if chat else "openai"
        self.base_url = base_url.rstrip("/")
        self.chat = chat
        self.endpoint = endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
        self.model, self.timeout_s, self.temperature = model, timeout_s, temperature
        self.server_pid, self.server_metrics = server_pid, server_metrics
        self.session: aiohttp.ClientSession | None = None
        self._peak_rss_mb: float | None = None
        self._peak_kv: float | None = None
        self._sampler: asyncio.Task | None = None

    async def start(self) -> None:
        # No connection cap: the load generator's --max-concurrency is the only limit.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:  # any HTTP answer will do: this only tells "nobody listens there" apart from per-request failures
            async with self.session.get(self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=10)):
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            await self.session.close()
            raise UserError(f"cannot reach a server at {self.base_url} ({type(e).__name__}: {e}); "
                            "start one or fix --base-url") from None
        if self.server_pid or self.server_metrics:
            self._sampler = asyncio.create_task(self._sample())

    async def aclose(self) -> None:
        if self._sampler:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if self.session:
            await self.session.close()

    def _payload(self, spec: RequestSpec) -> dict:
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "temperature": self.temperature, "ignore_eos": spec.ignore_eos}
        if self.chat:
            body |= {"messages": [{"role": "user", "content": spec.prompt}], "max_completion_tokens": spec.output_len}
        else:
            body |= {"prompt": spec.prompt, "max_tokens": spec.output_len}
        return body

    async def send(self, spec: RequestSpec) -> RequestRecord:
        assert self.session is not None, "call start() first"
        rec = RequestRecord(spec.prompt_len)
        text, chunks, done, usage_tokens = [], 0, False, None
        start = last = time.perf_counter()
        rec.start_s = start
        try:
            async with self.session.post(self.base_url + self.endpoint, json=self._payload(spec)) as resp:
                if resp.status != 200:
                    rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return rec
                buffer = b""
                async for piece in resp.content.iter_any():
                    buffer += piece
                    while b"\n\n" in buffer:  # one SSE event per blank-line-terminated block
                        event, buffer = buffer.split(b"\n\n", 1)
                        data = event.decode().strip().removeprefix("data:").strip()
                        if not data or data.startswith(":"):
                            continue
                        if data == "[DONE]":
                            done = True
                            continue
                        msg = json.loads(data)
                        if msg.get("choices"):
                            now = time.perf_counter()
                            if chunks == 0:
                                rec.ttft_s = now - start
                            else:
                                rec.itl_s.append(now - last)
                            last, chunks = now, chunks + 1
                            choice = msg["choices"][0]
                            text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
                        if msg.get("usage"):
                            usage_tokens = msg["usage"].get("completion_tokens")
                            rec.prompt_len = msg["usage"].get("prompt_tokens") or rec.prompt_len
                        if msg.get("error"):
                            rec.error = f"server error in stream: {msg['error']}"
                            return rec
        except asyncio.TimeoutError:
            rec.error = f"timeout after {self.timeout_s:g} s ({chunks} chunks received)"
            return rec
        except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as e:
            rec.error = f"{type(e).__name__}: {e} ({chunks} chunks received)"
            return rec
        if not done:
            rec.error = f"stream ended before [DONE] ({chunks} chunks received)"
        elif chunks == 0:
            rec.error = "no token received"
        else:
            rec.success = True
        rec.output_len = usage_tokens if usage_tokens is not None else chunks
        rec.e2el_s = last - start
        rec.generated_text = "".join(text)
        return rec

    async def _sample(self) -> None:
        import psutil
        proc = psutil.Process(self.server_pid) if self.server_pid else None
        while True:
            if proc is not None:
                try:
                    rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
                    self._peak_rss_mb = max(self._peak_rss_mb or 0.0, rss)
                except psutil.Error:
                    proc = None
            if self.server_metrics:
                try:
                    async with self.session.get(self.base_url + "/metrics") as resp:
                        if resp.status == 200:
                            for line in (await resp.text()).splitlines():
                                if line.startswith(KV_USAGE_METRICS):
                                    self._peak_kv = max(self._peak_kv or 0.0, float(line.rsplit(" ", 1)[1]))
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass  # a server without /metrics: KV usage stays unknown
            await asyncio.sleep(1.0)

    def peak_memory_mb(self) -> float | None:
        return self._peak_rss_mb

    def kv_cache_usage(self) -> float | None:
        return self._peak_kv

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model, "base_url": self.base_url, "endpoint": self.endpoint}


def from_args(args: argparse.Namespace) -> OpenAIBackend:
    return OpenAIBackend(args.base_url, args.served_model_name or str(args.model), args.backend == "openai-chat",
                         args.endpoint, args.request_timeout, args.server_pid, args.server_metrics)
