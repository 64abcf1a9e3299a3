"""engines.profile_steps: every step is recorded with its kind, and every prompt token is counted once."""
from engines.ours import LLM
from engines.profile_steps import run, summary


def test_steps_are_split_by_kind_and_count_every_prefill_token(tiny):
    llm = LLM(tiny, max_num_seqs=8, max_model_len=128, enable_prefix_caching=False, skip_tokenizer_init=True)
    steps = run(llm, [(16, 4), (24, 6), (8, 3)], rate=1000.0, vocab=200)
    assert sum(s["prefill_tokens"] for s in steps) == 16 + 24 + 8
    assert {s["kind"] for s in steps} == {"decode only", "with prefill"}
    table = summary(steps)
    assert abs(sum(r["share_of_time"] for r in table.values()) - 1) < 1e-9
    assert not llm.has_unfinished_requests() and llm.runner.launch.__name__ == "launch"  # the wrapper is removed


def test_warm_up_leaves_an_empty_engine(tiny):
    llm = LLM(tiny, max_num_seqs=4, max_model_len=64, num_kv_blocks=16, skip_tokenizer_init=True)
    free = llm.block_manager.num_free_blocks
    llm.warm_up()
    assert not llm.has_unfinished_requests() and not llm.requests and llm.block_manager.num_free_blocks == free


def test_stall_trace_counts_garbage_collection_and_cleans_up():
    import gc

    from engines.stall_trace import StallTrace

    callbacks = list(gc.callbacks)
    trace = StallTrace()
    with trace.active():
        gc.collect()
        first = trace.take()
        second = trace.take()
    assert first["gc_ms"] > 0 and second == {"triton_compiles": [], "gc_ms": 0.0}  # take() resets
    assert gc.callbacks == callbacks
