"""The GPU pieces of our engine checked against the reference paths: the Triton paged-decode kernel (run here by
Triton's interpreter on CPU) against gather + plain attention, and, on a GPU, CUDA-graph decoding against eager."""
import random

import pytest
import torch
from triton_interpreter import run_interpreted

from core.generate import SamplingParams
from core.kv_cache import attention
from engines.ours import LLM


def gathered_attention(q, k_pool, v_pool, tables, seq_lens):
    """Reference: copy each sequence's keys out of its blocks, then plain attention. q [B, H, D] -> [B, H, D]."""
    outs = []
    hkv, d = k_pool.shape[2], k_pool.shape[3]
    for i, n in enumerate(seq_lens.tolist()):
        blocks = tables[i, :-(-n // k_pool.shape[1])].long()
        keys = k_pool[blocks].reshape(-1, hkv, d)[:n].transpose(0, 1)[None]
        values = v_pool[blocks].reshape(-1, hkv, d)[:n].transpose(0, 1)[None]
        outs.append(attention(q[i][None, :, None], keys, values, None)[0, :, 0])
    return torch.stack(outs)


def check_kernel(heads: int, kv_heads: int, head_dim: int, block_size: int, dev: str,
                 dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None) -> None:
    """Every variant in float32 against the reference to 1e-5; in a 16-bit dtype the default (tensor-core) path,
    whose probabilities are rounded to that dtype before the second product, against the reference computed in
    float32 from the same rounded inputs. kv_dtype: pools stored in another dtype (FP8), the reference computed from
    the same stored values."""
    from engines.ours.triton_attention import paged_decode_attention
    g = torch.Generator().manual_seed(0)
    seq_lens = [1, 7, 3 * block_size, 3 * block_size + 1, 50]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered over the pool
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = torch.tensor(order[:nb])
        order = order[nb:]
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    if dtype != torch.float32:
        q = q.to(dtype)
        k_pool, v_pool = k_pool.to(kv_dtype or dtype), v_pool.to(kv_dtype or dtype)
        expected = gathered_attention(q.float(), k_pool.float(), v_pool.float(), tables, lens)
        for splits in (1, 4):
            out = paged_decode_attention(*[t.to(dev) for t in (q, k_pool, v_pool, tables, lens)], num_splits=splits)
            torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2)
        return
    if kv_dtype is not None:
        k_pool, v_pool = k_pool.to(kv_dtype), v_pool.to(kv_dtype)
    expected = gathered_attention(q, k_pool.float(), v_pool.float(), tables, lens)
    # The same values stored head-major ([block, head, token, dim], seen through a transposed view): other strides.
    head_major = [pool.transpose(1, 2).contiguous().transpose(1, 2) for pool in (k_pool, v_pool)]
    token_major = (k_pool, v_pool)
    # splits 4: the short sequences leave some splits empty, the merge must ignore them
    for pools, splits, dot in [(token_major, 1, False), (token_major, 4, False), (head_major, 4, False),
                               (token_major, 1, True), (head_major, 4, True)]:
        out = paged_decode_attention(*[t.to(dev) for t in (q, *pools, tables, lens)], num_splits=splits, dot=dot)
        torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def check_engine_with_triton(async_scheduling: bool, kv_cache_dtype: str = "auto") -> None:
    """The whole GPU path inside the engine, replayed eagerly: decode-only steps through the decode graphs' buffers
    (split-K kernel, padding rows), every other step through the mixed graphs' buffers (unified kernel, padded
    tokens and tiles), with chunked prefills (a small token budget) and prefix-cache hits (shared prompt heads),
    staggered arrivals: same greedy tokens as the plain decode loop (tiny model, float64), with and without async
    scheduling (then decodes take their input token from the previous step's output, in the static buffers).
    With an FP8 KV cache the reference is the engine's own reference path (gather + attention) over an FP8 cache:
    both must round and store the same keys and values."""
    from core.generate import generate
    from core.loading import load_model
    from engines.ours.model_runner import ModelRunner
    lm = load_model("tiny", "cpu", torch.float64, random_weights=True)
    rng = random.Random(4)
    shared = [rng.randrange(3, 49152) for _ in range(9)]
    prompts = [shared * (i % 2) + [rng.randrange(3, 49152) for _ in range(rng.randint(3, 30))] for i in range(7)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    kw = dict(block_size=4, num_kv_blocks=96, max_model_len=64, max_num_seqs=5, max_num_batched_tokens=36,
              kv_cache_dtype=kv_cache_dtype)
    llm = LLM(lm, async_scheduling=async_scheduling, **kw)
    llm.runner = runner = ModelRunner(lm.model, 96, 4, 64, 5, cuda_graph=True, use_triton=True,
                                      max_num_batched_tokens=36, kv_dtype=llm.runner.cache.keys[0].dtype)
    assert runner.mixed_graphs.sizes == [32, 36]
    ran = []
    for name, graphs in (("decode", runner.graphs), ("mixed", runner.mixed_graphs)):
        graphs.run = lambda *a, name=name, run=graphs.run: ran.append(name) or run(*a)
    seqs, step = [], 0
    while step < 3 * len(prompts) or llm.has_unfinished_requests():  # a new request every third step
        if step % 3 == 0 and step // 3 < len(prompts):
            seqs.append(llm.add_request(None, prompts[step // 3], params))
        llm.step()
        step += 1
    if kv_cache_dtype == "auto":
        expected = [generate(lm.model, [p], params).tokens[0] for p in prompts]
    else:
        expected = [o.token_ids for o in LLM(lm, **kw).generate(prompts, params, use_tqdm=False)]
    assert [s.output_token_ids for s in seqs] == expected
    assert {"decode", "mixed"} <= set(ran)
    assert llm.block_manager.num_free_blocks == 96


SHAPES = [(9, 3, 64, 16), (4, 4, 32, 4), (8, 2, 16, 1), (32, 32, 128, 16)]


def test_triton_paged_decode_matches_plain_attention_interpreted():
    """Triton's CPU interpreter runs the same kernel code (alone, then inside the engine); it must be switched on
    before Triton is imported, so the check runs in a fresh process."""
    run_interpreted("from test_engines_core_kernels import check_kernel, check_engine_with_triton, SHAPES\n"
                    "for shape in SHAPES: check_kernel(*shape, 'cpu')\n"
                    "check_engine_with_triton(False)\n"
                    "check_engine_with_triton(True)\n"
                    "check_kernel(*SHAPES[0], 'cpu', kv_dtype=torch.float8_e4m3fn)\n"
                    "check_engine_with_triton(True, 'fp8')\n")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_paged_decode_matches_plain_attention_gpu(shape):
    check_kernel(*shape, "cuda")
    check_kernel(*shape, "cuda", torch.bfloat16)
    check_kernel(*shape, "cuda", torch.bfloat16, torch.float8_e4m3fn)


@pytest.mark.gpu
def test_cuda_graph_decoding_equals_eager():
    """Same greedy tokens with decode steps replayed from CUDA graphs (padded batch sizes) as eager, float32.
    Compilation is left off here (it reorders float sums); compiled layers are checked on CPU and by
    engines/gpu_bench.py's logit-error column on a GPU."""
    from core.loading import load_model
    lm = load_model("tiny", "cuda", torch.float32, random_weights=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 40))] for _ in range(11)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    kw = dict(block_size=16, num_kv_blocks=128, max_model_len=256, max_num_seqs=16, skip_tokenizer_init=True)
    eager = LLM(lm, enforce_eager=True, **kw).generate(prompts, params, use_tqdm=False)
    graphed_llm = LLM(lm, torch_compile=False, **kw)
    assert graphed_llm.runner.graphs is not None
    graphed = graphed_llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]


@pytest.mark.gpu
def test_serving_compiles_no_kernel_after_start():
    """Every Triton kernel a step can need is compiled while the engine starts: the graphs hold the layers', and the
    INT4 LM head, which runs outside them at any row count, is run at each one (ModelRunner.warm_up_lm_head). Its
    first call at a new row count stalled serving for seconds before."""
    from core.loading import load_model
    from engines.stall_trace import StallTrace
    from quantization.linear import quantize_embeddings, quantize_model, set_backend
    lm = load_model("tiny", "cuda", torch.float16, random_weights=True)
    quantize_model(lm.model, "int4", 32)
    quantize_embeddings(lm.model)
    set_backend(lm.model, "triton")
    llm = LLM(lm, max_num_seqs=24, num_kv_blocks=256, max_model_len=96, max_num_batched_tokens=256,
              skip_tokenizer_init=True, torch_compile=False)
    rng = random.Random(0)
    with StallTrace().active() as trace:
        for batch in (1, 5, 17, 24):
            prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(2, 60))] for _ in range(batch)]
            llm.generate(prompts, SamplingParams(max_tokens=rng.randint(2, 9), ignore_eos=True), use_tqdm=False)
        assert trace.take()["triton_compiles"] == []
