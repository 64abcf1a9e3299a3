"""Data parallelism for serving: N independent engine replicas behind a small router.

Each replica is a whole copy of the model serving the OpenAI API (our engine's server, or vLLM's, or anything
compatible); the router forwards each request, streaming, to one of them. Replicas share nothing, so throughput
scales with their number as long as the router spreads the load well. Two policies:
- round-robin: replica 0, 1, ..., N-1, 0, ... regardless of how busy each is;
- least-outstanding: the replica with the fewest requests in flight (ties in round-robin order). With requests of
  very different lengths, round-robin can stack long ones on one replica while another idles; this cannot.

    python -m parallelism.router --num-replicas 2 --policy least-outstanding --port 8000        # starts 2 servers
    python -m parallelism.router --replica-urls http://127.0.0.1:8001 http://127.0.0.1:8002      # in front of yours
Then point any client or the harness at http://127.0.0.1:8000 (GET /router/stats shows the spread).
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import aiohttp
from aiohttp import web

from core.errors import UserError, cli

POLICIES = ("round-robin", "least-outstanding")
SESSION = web.AppKey("session", aiohttp.ClientSession)  # the one client session to the replicas


class Router:
    """Picks a replica per request and counts what each one is doing. Not thread-safe: one asyncio loop uses it."""

    def __init__(self, urls: list[str], policy: str = "least-outstanding"):
        if not urls:
            raise UserError("the router needs at least one replica")
        if policy not in POLICIES:
            raise UserError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.urls, self.policy = [u.rstrip("/") for u in urls], policy
        self.outstanding = [0] * len(urls)
        self.served = [0] * len(urls)
        self._turn = itertools.cycle(range(len(urls)))

    def pick(self) -> int:
        start = next(self._turn)
        if self.policy == "round-robin":
            return start
        order = [(start + k) % len(self.urls) for k in range(len(self.urls))]
        return min(order, key=lambda i: self.outstanding[i])  # min keeps the first of equals: round-robin ties

    @contextmanager
    def route(self) -> Iterator[int]:
        """The replica for one request, counted as outstanding until the block exits (finished, failed or cut)."""
        i = self.pick()
        self.outstanding[i] += 1
        self.served[i] += 1
        try:
            yield i
        finally:
            self.outstanding[i] -= 1

    def stats(self) -> dict:
        return {"policy": self.policy, "replicas": [{"url": u, "served": s, "outstanding": o}
                                                    for u, s, o in zip(self.urls, self.served, self.outstanding)]}


def make_app(router: Router) -> web.Application:
    """An aiohttp app that forwards the OpenAI endpoints to the router's choice and streams the answer back."""
    app = web.Application()

    async def start_session(app):
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                               timeout=aiohttp.ClientTimeout(total=None))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(start_session)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with router.route() as i:
            try:
                async with request.app[SESSION].post(router.urls[i] + request.path, data=body,
                                                       headers={"Content-Type": "application/json"}) as up:
                    resp = web.StreamResponse(status=up.status, headers={
                        "Content-Type": up.headers.get("Content-Type", "application/json")})
                    await resp.prepare(request)
                    async for chunk in up.content.iter_any():  # tokens pass through as they arrive
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
            except aiohttp.ClientError as e:
                return web.json_response({"error": {"message": f"replica {router.urls[i]} failed: {e}",
                                                    "type": "BadGateway", "param": None, "code": 502}}, status=502)

    async def models(request: web.Request) -> web.Response:
        async with request.app[SESSION].get(router.urls[0] + "/v1/models") as up:
            return web.Response(body=await up.read(), status=up.status, content_type="application/json")

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "replicas": len(router.urls)})

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(router.stats())

    app.router.add_post("/v1/completions", forward)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/router/stats", stats)
    return app


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url/health until it answers 200; a UserError if the process dies or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"the replica for {url} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise UserError(f"{url} was not ready after {timeout_s:.0f} s")


@contextmanager
def replicas(num: int, base_port: int, server_args: list[str], device: str = "cpu",
             ready_timeout_s: float = 300, log_dir: str | None = None) -> Iterator[list[str]]:
    """Start `num` of our engine's servers on base_port, base_port+1, ...; yields their URLs; stops them after.

    On CUDA, replica i sees only GPU i (CUDA_VISIBLE_DEVICES). On a CPU each replica gets an equal share of the
    cores as threads, so N replicas do not fight over them.
    """
    procs, urls = [], []
    cores = max((os.cpu_count() or 1) // num, 1)
    try:
        for i in range(num):
            env = dict(os.environ)
            if device.startswith("cuda"):
                env["CUDA_VISIBLE_DEVICES"] = str(i)
            else:
                env["OMP_NUM_THREADS"] = str(cores)
            port = base_port + i
            log = open(os.path.join(log_dir, f"replica{i}.log"), "w") if log_dir else subprocess.DEVNULL
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "engines.ours.server", "--host", "127.0.0.1", "--port", str(port),
                 "--device", "cuda" if device.startswith("cuda") else device, "--disable-uvicorn-access-log",
                 "--uvicorn-log-level", "warning", *server_args], env=env, stdout=log, stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs):
            wait_healthy(url, ready_timeout_s, proc)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", choices=POLICIES, default="least-outstanding")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replica-urls", nargs="+", help="route to these running servers instead of starting ours")
    parser.add_argument("--num-replicas", type=int, default=2, help="servers of our engine to start")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: replica i on GPU i")
    parser.add_argument("--replica-base-port", type=int, default=None, help="default: --port + 1")
    args, server_args = parser.parse_known_args(argv)  # the rest goes to each replica (--model, --max-num-seqs, ...)
    if args.replica_urls and server_args:
        raise UserError(f"unknown arguments {server_args}: replica options only apply to replicas started here")
    if args.num_replicas < 1:
        raise UserError("--num-replicas must be >= 1")

    def serve(urls: list[str]) -> None:
        print(f"router ({args.policy}) on http://{args.host}:{args.port} -> {', '.join(urls)}", flush=True)
        web.run_app(make_app(Router(urls, args.policy)), host=args.host, port=args.port, print=None)

    if args.replica_urls:
        serve(args.replica_urls)
    else:
        with replicas(args.num_replicas, args.replica_base_port or args.port + 1, server_args, args.device) as urls:
            serve(urls)


if __name__ == "__main__":
    main()
