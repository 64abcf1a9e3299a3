"""A stand-in OpenAI-compatible server that answers instantly: it streams --tokens chunks as fast as it can.

It measures the harness, not a model: against it, every millisecond of TTFT and every missed request rate is the
client's own cost. Prompts can ask for failures, to test how the harness records them:
  "STUB_HTTP_500" -> status 500;  "STUB_DROP" -> the connection closes after 2 tokens;
  "STUB_SLOW" -> waits 30 s before answering (a timeout).
Run: python -m benchmarks stub-server --port 0   (prints "listening on PORT" once bound).
"""
from __future__ import annotations

import asyncio
import json
import socket

from aiohttp import web


def make_app(tokens: int) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body.get("prompt") or json.dumps(body.get("messages", ""))
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or tokens)
        if "STUB_HTTP_500" in prompt:
            return web.json_response({"error": "stub failure"}, status=500)
        if "STUB_SLOW" in prompt:
            await asyncio.sleep(30)
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            if "STUB_DROP" in prompt and i == 2:
                request.transport.close()  # a dropped stream: no [DONE], the chunked body never ends
                return resp
            choice = {"index": 0, "delta": {"content": " x"}} if chat else {"index": 0, "text": " x"}
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": n}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    return app


def serve(port: int = 0, tokens: int = 16) -> None:
    """Serve on 127.0.0.1 until killed; port 0 picks a free one and prints it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    web.run_app(make_app(tokens), sock=sock, print=None, access_log=None)
