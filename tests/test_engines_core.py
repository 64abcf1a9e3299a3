"""Our engine: the allocator's reference counts, prefix sharing, and greedy outputs equal to core.generate's for
staggered mixed-length batches, with chunked prefill, forced preemption and prefix caching, and no leaked blocks."""
import random

import pytest
import torch

from core.errors import UserError
from core.generate import SamplingParams, chat_prompt, generate
from core.loading import load_model
from engines.ours import LLM
from engines.ours.block_manager import BlockAllocator, BlockManager
from engines.ours.sequence import Sequence


@pytest.fixture(scope="module")
def tiny64():
    """The tiny random Llama in float64: random weights give close logits, and float64 keeps batching-order
    rounding far below them, so greedy equality is a test of the algorithm, not of luck."""
    return load_model("tiny", "cpu", torch.float64, random_weights=True)


def assert_pool_full(llm: LLM):
    alloc = llm.block_manager.allocator
    assert alloc.num_free == alloc.num_blocks and not any(alloc.ref_counts)
    assert not llm.requests and not llm.has_unfinished_requests()


def run_staggered(llm: LLM, arrivals: dict[int, list[list[int]]], params: SamplingParams) -> list[list[int]]:
    """Add prompts at the given step numbers (continuous batching), step until all are done."""
    order, done, step = [], {}, 0
    while step <= max(arrivals) or llm.has_unfinished_requests():
        for prompt in arrivals.get(step, []):
            order.append(llm.add_request(None, prompt, params).request_id)
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        step += 1
    return [done[r] for r in order]


def reference(lm, prompts, params):
    return [generate(lm.model, [p], params).tokens[0] for p in prompts]


# --- the allocator and the block manager ------------------------------------------------------------------------

def test_allocator_reference_counts():
    a = BlockAllocator(4)
    x = a.allocate()
    a.share(x)
    assert a.ref_counts[x] == 2 and a.num_free == 3
    a.release(x)
    assert a.num_free == 3
    a.release(x)
    assert a.num_free == 4
    with pytest.raises(RuntimeError):
        a.release(x)


def test_freed_cached_block_is_reused_until_evicted():
    a = BlockAllocator(2)
    x = a.allocate()
    a.register(x, 123)
    a.release(x)  # free, but its content stays findable
    assert a.lookup(123) == x
    a.share(x)  # taken back out of the free list
    assert a.num_free == 1 and a.ref_counts[x] == 1
    a.release(x)
    others = [a.allocate(), a.allocate()]  # the other free block goes first, then x is evicted
    assert others[1] == x and a.lookup(123) is None


def test_prefix_blocks_shared_and_last_token_recomputed():
    bm = BlockManager(num_blocks=16, block_size=4)
    p = SamplingParams()
    a = Sequence(list(range(12)), p)
    bm.take_cached_prefix(a)
    assert bm.ensure_slots(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    bm.register_computed_blocks(a)
    b = Sequence(list(range(10)) + [99, 98], p)  # shares two full blocks with a
    bm.take_cached_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    c = Sequence(list(range(12)), p)  # same 12 tokens: the third block holds the last token, so it is not reused
    bm.take_cached_prefix(c)
    assert c.num_computed_tokens == 8
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 16


def test_ensure_slots_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = Sequence(list(range(5)), SamplingParams())
    assert bm.ensure_slots(s, 5) and len(s.block_table) == 2
    assert not bm.ensure_slots(s, 13) and len(s.block_table) == 2


# --- greedy equality with the plain decode loop ---------------------------------------------------------------

def random_prompts(n, seed, lo=3, hi=40, shared_prefix=0):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 49152) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 49152) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("case", [
    dict(num_kv_blocks=64, max_num_batched_tokens=2048),                           # plenty of memory
    dict(num_kv_blocks=64, max_num_batched_tokens=7),                              # prefill in chunks of <= 7
    dict(num_kv_blocks=16, max_num_batched_tokens=16, max_model_len=64),           # forced preemption
    dict(num_kv_blocks=16, max_num_batched_tokens=16, max_model_len=64, enable_prefix_caching=False),
    dict(num_kv_blocks=600, max_num_batched_tokens=2048, block_size=1),
])
def test_greedy_equals_plain_generation_tiny(tiny64, case, async_scheduling):
    """Async scheduling (each step launched before the previous one's tokens are back) must change nothing."""
    case = dict(case)
    params = SamplingParams(max_tokens=8 if "max_model_len" in case else 12, ignore_eos=True)
    prompts = random_prompts(7, seed=1, shared_prefix=9) + random_prompts(3, seed=2, hi=20)
    arrivals = {0: prompts[:4], 1: prompts[4:6], 3: prompts[6:8], 9: prompts[8:]}
    llm = LLM(tiny64, block_size=case.pop("block_size", 4), max_model_len=case.pop("max_model_len", 128),
              async_scheduling=async_scheduling, **case)
    assert run_staggered(llm, arrivals, params) == reference(tiny64, prompts, params)
    if case["num_kv_blocks"] == 16:
        assert llm.scheduler.num_preemptions > 0  # the case really exercised preemption
    assert_pool_full(llm)


def test_prefix_cache_hits_on_shared_prefix(tiny64):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = random_prompts(6, seed=3, lo=2, hi=5, shared_prefix=32)
    llm = LLM(tiny64, block_size=8, num_kv_blocks=64, max_model_len=128)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert [o.token_ids for o in first + rest] == reference(tiny64, prompts, params)
    assert llm.stats()["prefix_cache_hits"] == 5 * 32  # every later request reuses the 4 shared full blocks
    assert_pool_full(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_equals_plain_generation_default_model(smollm, async_scheduling):
    """Real weights, chat prompts, EOS stops, preemption and prefix caching (the system prompt is shared). With
    async scheduling a request that stops on EOS has one more token computed, which must not show."""
    questions = ["What is the capital of France?", "Name three colours.", "What is 2+2?", "Say hello."]
    prompts = [chat_prompt(smollm.tokenizer, q) for q in questions]
    params = SamplingParams(max_tokens=12)
    llm = LLM(smollm, block_size=8, num_kv_blocks=10, max_model_len=64, max_num_batched_tokens=48,
              async_scheduling=async_scheduling)
    out = run_staggered(llm, {0: prompts[:2], 2: prompts[2:]}, params)
    assert out == reference(smollm, prompts, params)
    assert llm.scheduler.num_preemptions > 0 and llm.stats()["prefix_cache_hits"] > 0
    assert_pool_full(llm)


def test_generate_outputs_and_metrics(tiny64):
    llm = LLM(tiny64, block_size=4, num_kv_blocks=32, max_model_len=128)
    outs = llm.generate([[5, 6, 7], "hello world"], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert outs[0].prompt_token_ids == [5, 6, 7] and outs[1].prompt == "hello world"
    for o in outs:
        m = o.metrics
        assert len(o.token_ids) == 5 and o.finish_reason == "length" and o.finished
        assert len(m.token_times) == 5 and m.arrival_time <= m.first_token_time == m.token_times[0]
        assert o.text == tiny64.tokenizer.decode(o.token_ids, skip_special_tokens=True)


def test_seeded_sampling_reproduces(tiny64):
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    llm = LLM(tiny64, block_size=4, num_kv_blocks=32, max_model_len=128)
    a = llm.generate([[1, 2, 3]], p, use_tqdm=False)[0].token_ids
    b = llm.generate([[1, 2, 3], [4, 5]], p, use_tqdm=False)[0].token_ids
    llm = LLM(tiny64, block_size=4, num_kv_blocks=32, max_model_len=128, async_scheduling=True)
    c = llm.generate([[4, 5], [1, 2, 3]], p, use_tqdm=False)[1].token_ids
    assert a == b == c


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_frees_blocks(tiny64, async_scheduling):
    llm = LLM(tiny64, block_size=4, num_kv_blocks=32, max_model_len=128, async_scheduling=async_scheduling)
    llm.add_request("x", list(range(3, 20)), SamplingParams(max_tokens=50, ignore_eos=True))
    llm.add_request("y", list(range(3, 9)), SamplingParams(max_tokens=5, ignore_eos=True))
    llm.step()
    llm.step()
    assert llm.block_manager.num_free_blocks < 32
    llm.abort("x")  # with async scheduling, while a step holding its next token is still out
    y = [o for _ in range(8) for o in llm.step() if o.finished]
    assert [o.request_id for o in y] == ["y"] and len(y[0].token_ids) == 5
    assert_pool_full(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_logprobs_are_the_models_log_softmax(tiny64, async_scheduling):
    """Each output token's log-probability and the top 3, against log_softmax of the plain model's logits at that
    position; for sampled requests too (raw distribution, before temperature); none for requests that did not ask."""
    llm = LLM(tiny64, block_size=4, num_kv_blocks=64, max_model_len=64, async_scheduling=async_scheduling)
    prompts = random_prompts(3, seed=5, hi=12)
    asked = [SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3),
             SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=1, logprobs=0), None]
    seqs = [llm.add_request(None, p, params or SamplingParams(max_tokens=6, ignore_eos=True))
            for p, params in zip(prompts, asked)]
    outs = {}
    while llm.has_unfinished_requests():
        outs.update((o.request_id, o) for o in llm.step() if o.finished)
    for seq, params in zip(seqs, asked):
        out = outs[seq.request_id]
        if params is None:
            assert out.logprobs is None
            continue
        assert len(out.logprobs) == len(out.token_ids) == 6
        ids = out.prompt_token_ids + out.token_ids
        with torch.no_grad():
            logits = tiny64.model(torch.tensor([ids]))[0]
        want = torch.log_softmax(logits.double(), -1)[len(out.prompt_token_ids) - 1:-1]
        for row, token, (chosen, top) in zip(want, out.token_ids, out.logprobs):
            assert chosen == pytest.approx(row[token].item(), abs=1e-6)
            values, indices = row.topk(params.logprobs)
            assert [t for t, _ in top] == indices.tolist()
            assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-6)
    with pytest.raises(UserError, match="logprobs"):
        llm.add_request(None, [1, 2], SamplingParams(logprobs=21))
    assert_pool_full(llm)


def test_async_scheduling_launches_before_collecting(tiny64):
    """Each step() launches a step and collects the one before: the newest token is a placeholder until then, and
    the decode that follows it is launched with the placeholder (its input filled in on the device)."""
    from engines.ours.sequence import PLACEHOLDER
    llm = LLM(tiny64, block_size=4, num_kv_blocks=32, max_model_len=128, async_scheduling=True)
    seq = llm.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    assert llm.step() == [] and seq.token_ids == [5, 6, 7, PLACEHOLDER]
    first = llm.step()  # launched the second token's step, then collected the first token
    assert [o.token_ids for o in first] == [seq.token_ids[3:4]] and seq.token_ids[4] == PLACEHOLDER
    assert seq.num_computed_tokens == 4
    outs = [o for _ in range(4) for o in llm.step()]
    assert outs[-1].finished and outs[-1].token_ids == seq.output_token_ids and PLACEHOLDER not in seq.token_ids
    assert outs[-1].token_ids == reference(tiny64, [[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert_pool_full(llm)


def test_user_errors(tiny64):
    with pytest.raises(UserError, match="fewer than max_model_len"):
        LLM(tiny64, num_kv_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(UserError, match="kv_cache_dtype must be one of auto, fp8"):
        LLM(tiny64, num_kv_blocks=32, max_model_len=16, kv_cache_dtype="int8")
    # a memory budget holds twice the tokens in FP8 as in 16 bits (here: 8x, the model being float64)
    fp8, auto = (LLM(tiny64, kv_cache_memory_gb=0.01, max_model_len=16, kv_cache_dtype=kv).block_manager.num_free_blocks
                 for kv in ("fp8", "auto"))
    assert fp8 // 8 == auto
    llm = LLM(tiny64, block_size=4, num_kv_blocks=32, max_model_len=16)
    with pytest.raises(UserError, match="longer than max_model_len"):
        llm.add_request(None, list(range(3, 30)))
    with pytest.raises(UserError, match="at least one token"):
        llm.add_request(None, [])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_decode_graph_buffers_equal_plain_generation(tiny64, async_scheduling):
    """The CUDA-graph path's static buffers and padding rows, run eagerly on CPU: same greedy tokens (with async
    scheduling, the previous step's tokens are written into the static input buffer on the device)."""
    from engines.ours.model_runner import ModelRunner
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = random_prompts(7, seed=4, hi=30)
    llm = LLM(tiny64, block_size=4, num_kv_blocks=96, max_model_len=64, max_num_seqs=5,
              async_scheduling=async_scheduling)
    llm.runner = ModelRunner(tiny64.model, 96, 4, 64, 5, cuda_graph=True)
    graphs = llm.runner.graphs
    assert graphs.sizes == [1, 2, 4, 5]
    replayed = []
    run = graphs.run
    graphs.run = lambda ids, *rest: replayed.append(len(ids)) or run(ids, *rest)
    out = run_staggered(llm, {0: prompts[:3], 2: prompts[3:5], 5: prompts[5:]}, params)
    assert out == reference(tiny64, prompts, params)
    assert {3, 5}.issubset(replayed)  # padded (3 -> 4) and full batches both ran through the buffers
    assert_pool_full(llm)


def test_graph_padding_writes_only_to_the_scratch_block(tiny64):
    """A graph replays its padded size: padding rows left behind by a larger step must be sent back to the scratch
    block, or they would overwrite keys of live sequences (too subtle for the tiny model's greedy tokens to show)."""
    pytest.importorskip("triton")  # the mixed graphs' tile table comes from the unified kernel's module
    from engines.ours.model_runner import ModelRunner
    runner = ModelRunner(tiny64.model, 96, 4, 64, 5, cuda_graph=True, use_triton=True, max_num_batched_tokens=36)
    mixed, scratch = runner.mixed_graphs, 96 * 4
    with torch.inference_mode():  # the buffers are inference tensors, as in ModelRunner.run
        assert mixed.load(list(range(35)), list(range(35)), list(range(100, 135))) == 36
        assert mixed.load([1, 2, 3, 4], [9, 9, 9, 9], [7, 8, 9, 10]) == 32
        assert mixed.slots[:4].tolist() == [7, 8, 9, 10] and set(mixed.slots[4:32].tolist()) == {scratch}
        decode = ModelRunner(tiny64.model, 96, 4, 64, 5, cuda_graph=True).graphs  # gather path: runs on a CPU
        decode.run([1, 2, 3, 4, 5], [8, 9, 10, 11, 12], [50, 51, 52, 53, 54], [[3, 4, 5, 6]] * 5)
        decode.run([1, 2, 3], [8, 9, 10], [60, 61, 62], [[3, 4, 5]] * 3)
        assert decode.slots[3:4].tolist() == [scratch] and decode.seq_lens[3:4].tolist() == [1]
        assert decode.tables[3, 0] == 96


def test_compiled_layers_equal_plain_generation():
    """torch.compile of the layers (the attention call left eager) on CPU: same greedy tokens, and one compiled
    piece serves every layer (the layer index must not be baked into the compiled code)."""
    lm = load_model("tiny", "cpu", "float32", random_weights=True)  # a model of its own: compiling changes it
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = random_prompts(4, seed=5, hi=20)
    expected = reference(lm, prompts, params)
    llm = LLM(lm, block_size=4, num_kv_blocks=64, max_model_len=48, max_num_seqs=4, torch_compile=True)
    assert run_staggered(llm, {0: prompts[:2], 3: prompts[2:]}, params) == expected
    assert_pool_full(llm)


@pytest.mark.parametrize("layers_too", [False, True])
def test_int4_lm_head_and_embedding_serve_as_the_model_computes(layers_too):
    """The case study's INT4 model (quantization.linear): the engine's CPU paths (fused or not, the LM head left to
    the quantized module) give the plain model's greedy tokens."""
    from quantization.linear import quantize_embeddings, quantize_model

    lm = load_model("tiny", "cpu", torch.float64, random_weights=True)
    if layers_too:
        quantize_model(lm.model, "int4", 32)
    quantize_embeddings(lm.model)
    prompts = [[random.Random(i).randrange(1000) for _ in range(5 + 3 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    llm = LLM(lm, block_size=4, num_kv_blocks=64, max_model_len=128)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == reference(lm, prompts, params)


def test_fp8_kv_cache_stores_rounded_keys_and_attends_over_them():
    """An FP8 pool (CPU reference path): a fresh prefill, then a decode, each equal to plain causal attention over
    keys and values rounded to e4m3 once (saturating at 448, not NaN), and the pool holds exactly those values."""
    from engines.ours.paged_cache import AttentionMetadata, DecodeGroup, FreshPrefillGroup, PagedKVCache
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, bs, table = 4, 2, 16, 4, [5, 2]
    cache = PagedKVCache(1, 8, bs, kv_heads, dim, torch.float32, torch.device("cpu"), kv_dtype=torch.float8_e4m3fn)
    q = torch.randn(1, heads, 7, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, 7, dim, generator=g) * 50 for _ in range(2))
    k[0, 0, 1, 0] = 1000.0  # beyond e4m3's range
    stored = [t.clamp(-448, 448).to(torch.float8_e4m3fn).float() for t in (k, v)]

    def expected(n_queries, n_keys):  # causal attention of the last n_queries positions over keys 0..n_keys-1
        keys, values = (t[0, :, :n_keys].repeat_interleave(heads // kv_heads, 0) for t in stored)
        scores = q[0, :, n_keys - n_queries:n_keys] @ keys.transpose(1, 2) / dim ** 0.5
        pos = torch.arange(n_keys - n_queries, n_keys)[:, None]
        scores = scores.masked_fill(torch.arange(n_keys)[None] > pos, float("-inf"))
        return scores.softmax(-1) @ values

    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(7)])
    cache.metadata = AttentionMetadata(slots[:6], [], [FreshPrefillGroup(torch.arange(6)[None], 6)], [])
    prefill = cache.attend(0, q[:, :, :6], k[:, :, :6], v[:, :, :6], None)
    torch.testing.assert_close(prefill[0], expected(6, 6))
    pool_keys = cache.keys[0].float().view(-1, kv_heads, dim)[slots[:6]].transpose(0, 1)
    assert torch.equal(pool_keys, stored[0][0, :, :6]) and pool_keys.abs().max() == 448
    decode = DecodeGroup(torch.tensor([0]), torch.tensor([table], dtype=torch.int32), torch.tensor([7]))
    cache.metadata = AttentionMetadata(slots[6:], [decode], [], [])
    torch.testing.assert_close(cache.attend(0, q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], None)[0], expected(1, 7))
