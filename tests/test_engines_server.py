"""Our OpenAI-compatible server: the official openai client gets core.generate's greedy text (completions, chat,
streaming, concurrent requests), disconnects free their KV blocks, bad requests get a 400 error body, /metrics
parses and counts, and the command line serves what the harness drives."""
import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.server import free_port, stop, wait_healthy
from core.generate import SamplingParams, chat_prompt, generate
from engines.ours.async_engine import AsyncLLMEngine
from engines.ours.llm_engine import LLMEngine
from engines.ours.server import IncrementalDetokenizer, build_app

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 512


@contextlib.contextmanager
def serve_in_thread(app):
    """uvicorn serving `app` from a thread of this process on a free loopback port; yields the base URL."""
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{uv.config.port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(smollm):
    """Our server in this process (so a test can look at the engine's block pool), on a free loopback port."""
    engine = LLMEngine(smollm, max_num_seqs=8, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    with serve_in_thread(build_app(AsyncLLMEngine(engine), MODEL)) as url:
        yield SimpleNamespace(url=url, engine=engine, client=openai.OpenAI(base_url=url + "/v1", api_key="none"),
                              tokenizer=smollm.tokenizer)


def greedy_text(lm, ids: list[int], max_tokens: int) -> str:
    tokens = generate(lm.model, [ids], SamplingParams(max_tokens=max_tokens)).tokens[0]
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


def wait_pool_full(engine: LLMEngine, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.requests:
            return
        time.sleep(0.05)
    raise AssertionError(f"blocks not freed: {engine.stats()}")


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics by name (histograms give their _count and _sum)."""
    text = httpx.get(url + "/metrics").text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


PROMPT = "The capital of France is"


def test_completion_matches_core_generate(server, smollm):
    want = greedy_text(smollm, smollm.tokenizer(PROMPT).input_ids, 16)
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(smollm.tokenizer(PROMPT).input_ids)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 16
    wait_pool_full(server.engine)


def test_chat_matches_core_generate(server, smollm):
    question = "What is the capital of France?"
    want = greedy_text(smollm, chat_prompt(smollm.tokenizer, question), 24)
    messages = [{"role": "user", "content": question}]
    r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                   stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_logprobs_in_both_formats(server, smollm):
    """Completions: parallel lists; chat: one entry per token. Greedy, so each chosen token is its position's most
    likely one; streamed chunks together carry the same logprobs as the whole answer; the engine's own figures (held
    to the model's log_softmax in test_engines_core) come through unchanged."""
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    for token, chosen, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert len(top) == 2 and chosen <= 0 and top[token] == chosen == max(top.values())
        assert r.choices[0].text[offset:].startswith(token)
    offline = LLMEngine(smollm, max_num_seqs=2, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    seq = offline.add_request(None, PROMPT, SamplingParams(max_tokens=8, logprobs=2))
    while offline.has_unfinished_requests():
        offline.step()
    assert lp.token_logprobs == pytest.approx([chosen for chosen, _ in seq.logprobs], abs=1e-5)
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                                   logprobs=2, stream=True))
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)  # 6: before the end-of-turn token
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and "".join(e.token for e in content) == \
        r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == e.logprob and bytes(e.bytes).decode() == e.token
    plain = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, top_logprobs=2)
    wait_pool_full(server.engine)


def test_n_choices(server, smollm):
    """n > 1: one engine request per choice on the same prompt. Greedy choices all equal the plain greedy answer;
    seeded sampled choices differ from each other and repeat exactly; streamed choices add up to the same texts;
    usage counts the prompt once and every choice's tokens."""
    want = greedy_text(smollm, smollm.tokenizer(PROMPT).input_ids, 8)
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.text == want for c in r.choices)
    assert r.usage.prompt_tokens == len(smollm.tokenizer(PROMPT).input_ids) and r.usage.completion_tokens == 24

    texts = [c.text for c in server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, n=3,
        extra_body={"ignore_eos": True}).choices]
    assert len(set(texts)) > 1
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7,
                                                   n=3, extra_body={"ignore_eos": True}, stream=True,
                                                   stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == texts and chunks[-1].usage.completion_tokens == 36

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, n=2,
                                                   stream=True)
    roles, contents = {}, {0: "", 1: ""}
    for c in stream:
        choice = c.choices[0]
        roles.setdefault(choice.index, choice.delta.role)
        contents[choice.index] += choice.delta.content or ""
    assert roles == {0: "assistant", 1: "assistant"} and contents[0] == contents[1] != ""
    wait_pool_full(server.engine)


def test_concurrent_requests_each_match(server, smollm):
    """Requests in flight together share engine steps (continuous batching) and still get their own answer."""
    prompts = ["Once upon a time", "def fibonacci(n):", "The three primary colors are", "Water boils at"]
    want = [greedy_text(smollm, smollm.tokenizer(p).input_ids, 12) for p in prompts]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")

    async def one(p):
        r = await client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
        return r.choices[0].text

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    assert asyncio.run(all_of_them()) == want
    wait_pool_full(server.engine)


def test_stop_string_cuts_the_text(server, smollm):
    full = greedy_text(smollm, smollm.tokenizer(PROMPT).input_ids, 16)
    stop = full.strip().split()[1]  # a word from the middle of the answer
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    # The same streamed, with the prompt sent as token ids.
    chunks = list(server.client.completions.create(model=MODEL, prompt=smollm.tokenizer(PROMPT).input_ids,
                                                   max_tokens=16, temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_pool_full(server.engine)


def test_streaming_disconnect_frees_blocks(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
            assert got and server.engine.requests  # it is running and holds blocks
    wait_pool_full(server.engine)
    assert scrape(server.url)["llmip:num_requests_running"] == 0


def test_non_streaming_disconnect_frees_blocks(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    wait_pool_full(server.engine)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b'{"model": "gpt-4", "prompt": "hi"}', "does not exist"),
    (b'{"prompt": "hi", "max_tokens": 0}', "at least 1"),
    (b'{"prompt": "hi", "n": 17}', "less than or equal to 16"),
    (b'{"prompt": "hi", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "hi", "echo": true}', "echo"),
    (b'{"max_tokens": 5}', "prompt"),
    (b'{"prompt": [1, 2, 99999999]}', "token ids"),
])
def test_bad_requests_get_400(server, body, message):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == 400


def test_prompt_longer_than_max_model_len_is_400(server):
    too_long = " hello" * (MAX_MODEL_LEN + 10)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client.completions.create(model=MODEL, prompt=too_long, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": too_long}])
    assert httpx.get(server.url + "/health").status_code == 200


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list()] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_parse_and_count(server):
    before = scrape(server.url)
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    after = scrape(server.url)
    diff = {k: after[k] - before.get(k, 0.0) for k in after}
    assert diff["llmip:request_success_total"] == 1
    assert diff["llmip:prompt_tokens_total"] == r.usage.prompt_tokens
    assert diff["llmip:generation_tokens_total"] == r.usage.completion_tokens == 5
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):
        assert diff[f"llmip:{h}_count"] == 1
    assert after["llmip:kv_cache_usage_perc"] == 0 and after["llmip:num_requests_waiting"] == 0
    assert "llmip:num_preemptions_total" in after


def test_incremental_detokenizer_rebuilds_multibyte_text(smollm):
    tok = smollm.tokenizer
    text = "Crème brûlée 🍮 costs 5€, 日本語も."
    ids = tok(text).input_ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.step(ids[:i]) for i in range(1, len(ids) + 1)]
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)


def test_cli_serves_tiny_model_and_harness_drives_it(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engines.ours.server", "--model", "tiny", "--port", str(port),
                             "--max-model-len", "256", "--max-num-seqs", "4", "--num-gpu-blocks-override", "64",
                             "--uvicorn-log-level", "warning"], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 120)
        out = tmp_path / "run.json"
        run = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--backend", "openai", "--base-url", url,
                              "--model", "tiny", "--tokenizer", MODEL, "--num-prompts", "6", "--random-input-len",
                              "32", "--random-output-len", "8", "--no-progress", "--out", str(out)],
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]
        import json
        metrics = json.loads(out.read_text())
        assert metrics["completed"] == 6 and metrics["failed"] == 0, metrics
        assert scrape(url)["llmip:request_success_total"] == 6
    finally:
        stop(proc)


def test_cli_bad_arguments_exit_2():
    r = subprocess.run([sys.executable, "-m", "engines.ours.server", "--gpu-memory-utilization", "1.5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ")
