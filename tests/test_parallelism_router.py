"""The data-parallel router: its policies, and its streaming pass-through in front of stand-in OpenAI servers."""
import asyncio

import aiohttp
import pytest
from aiohttp import web

from benchmarks.stub_server import make_app as stub_app
from core.errors import UserError
from parallelism.comm import free_port
from parallelism.router import Router, make_app


def test_round_robin_ignores_load():
    r = Router(["a", "b", "c"], "round-robin")
    r.outstanding = [5, 0, 0]
    assert [r.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_least_outstanding_prefers_idle_replicas_and_breaks_ties_in_turn():
    r = Router(["a", "b", "c"], "least-outstanding")
    r.outstanding = [5, 1, 1]
    assert [r.pick() for _ in range(4)] == [1, 1, 2, 1]  # never the busy one; ties go round
    r.outstanding = [0, 0, 0]
    assert sorted(r.pick() for _ in range(3)) == [0, 1, 2]


def test_route_counts_outstanding_until_done_even_on_error():
    r = Router(["a", "b"], "least-outstanding")
    with r.route() as i:
        assert r.outstanding[i] == 1
        with r.route() as j:
            assert j != i  # the idle replica
    with pytest.raises(RuntimeError):
        with r.route():
            raise RuntimeError("replica failed")
    assert r.outstanding == [0, 0] and sum(r.served) == 3


def test_bad_policy_or_no_replicas():
    with pytest.raises(UserError):
        Router(["a"], "random")
    with pytest.raises(UserError):
        Router([], "round-robin")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def _through_router(policy: str, n_requests: int, dead_replica: bool = False):
    runners, urls = [], []
    for tokens in (5, 7):  # the two replicas answer with different lengths, so each answer shows who served it
        runner, url = await _serve(stub_app(tokens))
        runners.append(runner)
        urls.append(url)
    if dead_replica:
        urls[1] = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    router = Router(urls, policy)
    runner, url = await _serve(make_app(router))
    runners.append(runner)
    bodies, statuses = [], []
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(n_requests):
                async with s.post(url + "/v1/completions", json={"prompt": "hi", "stream": True}) as resp:
                    statuses.append(resp.status)
                    bodies.append(await resp.text())
            async with s.get(url + "/router/stats") as resp:
                stats = await resp.json()
    finally:
        for r in runners:
            await r.cleanup()
    return bodies, statuses, stats


def test_router_streams_every_answer_through_and_spreads_requests():
    bodies, statuses, stats = asyncio.run(_through_router("round-robin", 4))
    assert statuses == [200] * 4
    assert all(b.rstrip().endswith("data: [DONE]") for b in bodies)
    assert [b.count('"text": " x"') for b in bodies] == [5, 7, 5, 7]  # replica 0, 1, 0, 1
    assert [r["served"] for r in stats["replicas"]] == [2, 2]
    assert [r["outstanding"] for r in stats["replicas"]] == [0, 0]


def test_dead_replica_gives_a_502_not_a_hang():
    bodies, statuses, stats = asyncio.run(_through_router("round-robin", 2, dead_replica=True))
    assert statuses == [200, 502]
    assert "failed" in bodies[1]
