"""The engine in its own process (engine_core.py), behind the same server: the openai client gets core.generate's
greedy text, streamed or not and concurrently; an error inside the engine process comes back as an error of that
request; a disconnect frees the blocks in the engine process; a dead engine process fails its requests and /health."""
import asyncio
import time

import httpx
import openai
import pytest

from core.errors import UserError
from core.generate import SamplingParams
from engines.ours.engine_core import ProcessLLMEngine
from engines.ours.server import build_app
from tests.test_engines_server import MODEL, PROMPT, greedy_text, scrape, serve_in_thread

ENGINE = dict(model=MODEL, device="cpu", dtype="float32", max_num_seqs=8, max_model_len=256, num_kv_blocks=64)


@pytest.fixture(scope="module")
def server():
    engine = ProcessLLMEngine(ENGINE)
    try:
        with serve_in_thread(build_app(engine, MODEL)) as url:
            yield engine, url, openai.OpenAI(base_url=url + "/v1", api_key="none")
    finally:
        engine.shutdown()


def wait_idle_pool(url: str, timeout_s: float = 20.0) -> None:
    """The engine process reports its gauges when it goes idle: no request running, no block in use."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = scrape(url)
        if m["llmip:num_requests_running"] == 0 and m["llmip:kv_cache_usage_perc"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"blocks not freed: {scrape(url)}")


def test_openai_client_gets_greedy_text(server, smollm):
    engine, url, client = server
    assert engine.info.max_model_len == 256 and engine.info.stats["num_blocks"] == 64
    want = greedy_text(smollm, smollm.tokenizer(PROMPT).input_ids, 16)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text == want
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want

    prompts = ["Once upon a time", "def fibonacci(n):", "Water boils at"]
    want = [greedy_text(smollm, smollm.tokenizer(p).input_ids, 12) for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")

    async def all_at_once():
        async with aclient:
            answers = await asyncio.gather(*(aclient.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                                        temperature=0) for p in prompts))
        return [a.choices[0].text for a in answers]

    assert asyncio.run(all_at_once()) == want
    wait_idle_pool(url)
    assert scrape(url)["llmip:request_success_total"] == 5


def test_logprobs_cross_the_pipe(server):
    """Each step's new logprobs travel with its new tokens; the stream's pieces add up to the whole answer's."""
    _, _, client = server
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    lp = whole.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and all(top[t] == c for t, c, top in zip(lp.tokens, lp.token_logprobs,
                                                                                   lp.top_logprobs))
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1,
                                       stream=True)
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs


def test_disconnect_frees_blocks_in_the_engine_process(server):
    _, url, _ = server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert any(next(lines).startswith("data:") for _ in range(6))
        assert scrape(url)["llmip:num_requests_running"] == 1
    wait_idle_pool(url)


def test_engine_error_comes_back_as_the_requests_error(server):
    engine, _, _ = server

    async def too_long():
        async for _ in engine.generate("too-long", list(range(300)), SamplingParams(max_tokens=4)):
            pass

    with pytest.raises(UserError, match="longer than max_model_len"):
        asyncio.run(too_long())


def test_start_up_error_is_a_user_error():
    with pytest.raises(UserError, match="exceeds the model's context"):
        ProcessLLMEngine({**ENGINE, "model": "tiny", "random_weights": True, "max_model_len": 10**6})


def test_dead_engine_process_fails_requests_and_health():
    engine = ProcessLLMEngine({**ENGINE, "model": "tiny", "random_weights": True})
    engine.start()

    async def long_request():
        async for out in engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)):
            if len(out.token_ids) == 2:
                engine._process.kill()

    try:
        with pytest.raises(RuntimeError, match="engine process stopped"):
            asyncio.run(long_request())
        assert not engine.is_running  # /health answers 503
    finally:
        engine.shutdown()
