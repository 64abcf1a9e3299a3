"""The case study's steps. Each adds one optimization to the one before and runs in a process of its own, so its
peak memory is its own. A step loads its model, serves the same workload at each request rate, and reports.

    baseline          transformers generate, static batches (FP16 on GPU, FP32 on CPU)
    awq-int4          + AWQ INT4 weights (our model; static batches)
    paged-continuous  + our engine: paged KV cache, continuous batching (same max batch as the baseline)
    tuned-batching    + batching tuned: the engine setting with the highest throughput from a small sweep
    kv-fp8            + keys and values cached in FP8 (e4m3): half the bytes each decode step reads (optional: run
                      when named; on a CPU no kernel reads FP8, the reference path converts every key it reads)
    speculative       INT4 + prompt-lookup speculative decoding, one request at a time (our engine does not batch
                      speculation yet): it shows what speculation buys a lone request and costs a loaded server
    vllm              the same workload on vLLM (its own quantization left off: BF16/FP32 weights), for comparison
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from core.generate import SamplingParams, generate
from core.loading import LoadedModel, load_model, resolve_device
from core.measure import gpu_peak_mb

from benchmarks.arrivals import arrival_times
from benchmarks.backends.base import RequestRecord, RequestSpec
from benchmarks.metrics import summarize
from optimization.online import serve_continuous, serve_static

STEPS = ("baseline", "awq-int4", "paged-continuous", "tuned-batching", "kv-fp8", "speculative", "vllm")
DESCRIPTIONS = {
    "baseline": "transformers generate, static batches",
    "awq-int4": "+ AWQ INT4 weights (ours, static batches)",
    "paged-continuous": "+ paged KV cache, continuous batching",
    "tuned-batching": "+ batching tuned (max seqs, token budget)",
    "kv-fp8": "+ FP8 KV cache (e4m3)",
    "speculative": "INT4 + prompt-lookup speculation, batch 1",
    "vllm": "vLLM on the same workload (comparison)",
}


@dataclass
class StepConfig:
    model: str
    device: str
    dtype: str | None
    random_weights: bool
    specs: list[RequestSpec]
    rates: list[float]  # request rates (req/s); inf = every request at t=0
    max_batch_size: int = 8
    quant: str = "awq"  # awq or rtn (random weights: calibration means nothing)
    int4_backend: str = "torch"  # Int4Linear backend: torch (tinygemm / its CPU twin) or triton (GPU: our GEMM)
    int4_head: bool = True  # LM head and embedding INT4 too (g32; GPTQ for the head after AWQ), not 16-bit
    calib_samples: int = 16
    ppl_tokens: int = 4096
    gpu_hour_price: float = 2.0
    seed: int = 0
    quantized_path: Path = Path("quantized.pt")  # where the INT4 model is saved once and reloaded by later steps
    tuning: list[tuple[int, int]] = field(default_factory=lambda: [(8, 512), (32, 1024), (64, 2048)])
    # measured after `rates`: multiples of the step's own throughput at rate inf (rates[0] must be inf), its
    # latency-throughput curve
    curve: tuple[float, ...] = ()
    # finite rates serve only the first latency_prompts requests (None: all): at the baseline's own saturation rate
    # its queue, and so its time, grows with the request count; rate inf, the throughput, always serves them all
    latency_prompts: int | None = None


def _ours_static_runner(lm: LoadedModel):
    """Static batches over core.generate; each row keeps its own first output_len tokens, timed as they appear."""

    def run_batch(specs: list[RequestSpec]) -> list[RequestRecord]:
        tok = lm.tokenizer
        prompts = [s.prompt_ids if s.prompt_ids is not None else tok(s.prompt).input_ids for s in specs]
        times: list[list[float]] = [[] for _ in specs]
        t0 = time.perf_counter()
        result = generate(lm.model, prompts, SamplingParams(max_tokens=max(s.output_len for s in specs),
                                                            ignore_eos=all(s.ignore_eos for s in specs)),
                          on_token=lambda row, _t: times[row].append(time.perf_counter()))
        records = []
        for spec, toks, stamps in zip(specs, result.tokens, times):
            n = min(spec.output_len, len(toks))
            records.append(RequestRecord.from_token_times(spec, t0, stamps[:n],
                                                          tok.decode(toks[:n], skip_special_tokens=True)))
        return records

    return run_batch


def _speculative_runner(lm: LoadedModel, k: int = 8):
    """One request at a time through prompt-lookup speculative decoding (greedy: the same tokens as plain decoding);
    the tokens a verification pass accepts arrive together, as a streamed chunk would."""
    from speculative.common import speculative_generate
    from speculative.prompt_lookup import PromptLookupProposer

    def run_batch(specs: list[RequestSpec]) -> list[RequestRecord]:
        records = []
        for spec in specs:
            ids = spec.prompt_ids if spec.prompt_ids is not None else lm.tokenizer(spec.prompt).input_ids
            params = SamplingParams(max_tokens=spec.output_len, ignore_eos=spec.ignore_eos)
            t0, stamps = time.perf_counter(), []
            result = speculative_generate(lm.model, ids, params, PromptLookupProposer(3, 1), k,
                                          on_step=lambda emitted: stamps.extend([time.perf_counter()] * len(emitted)))
            stamps.insert(0, t0 + result.ttft_s)
            n = min(spec.output_len, len(result.tokens))
            records.append(RequestRecord.from_token_times(
                spec, t0, stamps[:n], lm.tokenizer.decode(result.tokens[:n], skip_special_tokens=True)))
        return records

    return run_batch


def _quantized_model(cfg: StepConfig, dtype: str) -> tuple[LoadedModel, str]:
    """The INT4 model every step after the baseline serves. AWQ runs once and later steps reload its result from
    cfg.quantized_path; RTN is redone each time."""
    from quantization.awq import awq_model
    from quantization.gptq import gptq_embeddings
    from quantization.layerwise import calibration_ids
    from quantization.linear import HEAD_GROUP_SIZE, pick_group_size, quantize_embeddings, quantize_model, set_backend

    lm = load_model(cfg.model, cfg.device, dtype, cfg.random_weights)
    group = pick_group_size(lm.model, 0)
    method = "rtn" if cfg.quant == "rtn" else "awq"
    notes = (f"RTN INT4 g{group}" if method == "rtn" else
             f"AWQ INT4 g{group}, {cfg.calib_samples}x256 calibration tokens")
    if cfg.int4_head:
        notes += f"; LM head and embedding INT4 g{HEAD_GROUP_SIZE} ({'RTN' if method == 'rtn' else 'GPTQ'})"
    if method == "rtn":  # cheap and deterministic: redone in every step rather than saved
        quantize_model(lm.model, "int4", group)
        if cfg.int4_head:
            quantize_embeddings(lm.model)
    elif cfg.quantized_path.exists():
        lm.model = torch.load(cfg.quantized_path, map_location=resolve_device(cfg.device), weights_only=False)
    else:
        ids = calibration_ids(lm.tokenizer, cfg.calib_samples, 256)
        # A coarse grid (10 points) searched on 4 samples keeps a CPU run short; every sample still flows through the
        # layers. On the 2-core CI VM (2026-12-05) that took 48 s against 116 s for 20 points on 8 samples, with
        # perplexity 4.577 against 4.585 on 2,048 evaluation tokens: no worse.
        ids = ids.to(next(lm.model.parameters()).device)
        awq_model(lm.model, ids, group, n_grid=10, search_samples=4)
        if cfg.int4_head:
            gptq_embeddings(lm.model, ids)
        torch.save(lm.model, cfg.quantized_path)
    # "torch": PyTorch's packed INT4 kernels (tinygemm on CUDA, its twin on CPU), fastest at one row; "triton" (GPU):
    # our tensor-core GEMM up to 128 rows (3-6x faster than tinygemm at 64-256 rows per projection on an H100,
    # gemm_bench.py), dequantize + cuBLAS beyond.
    set_backend(lm.model, cfg.int4_backend)
    return lm, notes


class _Logits(torch.nn.Module):
    """transformers' model as `ids -> logits`, the signature core.perplexity expects."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(ids).logits


def _perplexity(model: torch.nn.Module, tokenizer, cfg: StepConfig) -> float | None:
    """Perplexity on the first cfg.ppl_tokens tokens of the evaluation split."""
    if cfg.ppl_tokens <= 0:
        return None
    from core.data import plain_text
    from core.perplexity import perplexity

    ids = tokenizer(plain_text("evaluation", max_chars=cfg.ppl_tokens * 6)).input_ids[: cfg.ppl_tokens]
    return perplexity(model, ids, window=1024, stride=512, progress=False)


def _weights_mb(model: torch.nn.Module) -> float:
    from quantization.linear import weight_bytes

    return weight_bytes(model) / 2**20


def _run_record(rate: float, cfg: StepConfig, records: list[RequestRecord], duration: float,
                stalls: dict | None = None) -> dict:
    """One rate's summary (vLLM's metric names, plus P50 end-to-end latency), texts and first errors, and for our
    engine its slowest loop turns (optimization/online.py)."""
    summary = summarize(records, duration, {"ttft": 100.0, "tpot": 50.0}, cfg.gpu_hour_price)
    lat = [r.e2el_s * 1e3 for r in records if r.success]
    summary["p50_e2el_ms"] = float(torch.tensor(lat).median()) if lat else None
    run = {"request_rate": rate, "summary": summary, "texts": [r.generated_text for r in records],
           "errors": [r.error for r in records if not r.success][:5]}
    if stalls is not None:
        run["stalls"] = stalls
    return run


def _serve_all(cfg: StepConfig, serve) -> list[dict]:
    """serve(specs, arrivals) -> (records, duration) at every rate; one summary (plus records) per rate.

    Two short requests go first, unrecorded, as in vLLM's benchmark: the first calls of a fresh process load
    kernels (and on a GPU may compile some), which is start-up, not serving."""
    warmup = [replace(s, output_len=min(s.output_len, 4)) for s in cfg.specs[:2]]
    serve(warmup, [0.0] * len(warmup))

    def at(rate: float) -> dict:
        specs = cfg.specs if math.isinf(rate) else cfg.specs[:cfg.latency_prompts]
        return _run_record(rate, cfg, *serve(specs, arrival_times(len(specs), rate, seed=cfg.seed)))

    out = [at(rate) for rate in cfg.rates]
    if cfg.curve:  # around this step's own capacity, so each curve shows its own knee
        if not math.isinf(cfg.rates[0]):
            raise ValueError("the curve is relative to the throughput at rate inf: list inf first")
        own = out[0]["summary"]["request_throughput"]
        out += [at(m * own) for m in cfg.curve if own and m * own not in cfg.rates]
    return out


def _engine(lm: LoadedModel, cfg: StepConfig, max_num_seqs: int, budget: int, kv_cache_dtype: str = "auto"):
    from engines.ours import LLM

    max_len = max(s.prompt_len + s.output_len for s in cfg.specs) + 16
    # One engine serves every rate in turn: prefix caching off, or a rerun would find its prompts already cached.
    # The INT4 layers stay uncompiled: with torch.compile, the engine's CUDA-graph capture of the 7B INT4 model failed
    # on the H100 ("operation failed due to a previous error during capture"); CUDA graphs alone worked.
    return LLM(lm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
               enable_prefix_caching=False, torch_compile=False, kv_cache_dtype=kv_cache_dtype)


def run_step(name: str, cfg: StepConfig) -> dict:
    """Run one step end to end in this process; returns its measurements (JSON-ready)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The book's baseline is FP16; on a CPU half precision is slow and partly unsupported, so FP32 there.
    dtype = cfg.dtype or ("float16" if device.type == "cuda" else "float32")
    notes = ""
    if name == "vllm":
        return _run_vllm(cfg, dtype)
    if name == "baseline":
        if cfg.random_weights:  # transformers cannot build our random weights; our loop computes the same function
            lm = load_model(cfg.model, cfg.device, dtype, True)
            notes = "random weights: our static-batch loop stands in for transformers (tested equal)"
            runner, model, label = _ours_static_runner(lm), lm.model, lm.label
        else:
            from benchmarks.backends.hf import HFBackend

            hf = HFBackend(cfg.model, cfg.device, dtype, cfg.max_batch_size)
            runner, model = hf.run_batch, _Logits(hf.model)
            label = f"{cfg.model} [transformers, trained weights, {dtype}, {device.type}]"
        runs = _serve_all(cfg, lambda specs, arr: serve_static(runner, specs, arr, cfg.max_batch_size))
        quality = None if cfg.random_weights else _perplexity(model, hf.tokenizer, cfg)
        weights = _weights_mb(model)
        return {"step": name, "label": label, "dtype": dtype, "notes": notes, "weights_mb": weights,
                "perplexity": quality, "gpu_peak_mb": gpu_peak_mb(device), "runs": runs}
    lm, notes = _quantized_model(cfg, dtype)
    weights = _weights_mb(lm.model)
    quality = None if lm.random_weights else _perplexity(lm.model, lm.tokenizer, cfg)
    if name == "awq-int4":
        runs = _serve_all(cfg, lambda specs, arr: serve_static(_ours_static_runner(lm), specs, arr,
                                                               cfg.max_batch_size))
    elif name == "paged-continuous":
        engine = _engine(lm, cfg, cfg.max_batch_size, 2048)
        runs = _serve_all(cfg, _traced(engine))
    elif name in ("tuned-batching", "kv-fp8"):
        kv = "fp8" if name == "kv-fp8" else "auto"
        best = _tune(lm, cfg, kv)  # tuned again: twice the tokens fit, the best setting may change
        notes += f"; max_num_seqs={best[0]}, max_num_batched_tokens={best[1]}"
        notes += "; FP8 KV cache" if kv == "fp8" else ""
        engine = _engine(lm, cfg, *best, kv)
        runs = _serve_all(cfg, _traced(engine))
    elif name == "speculative":
        if lm.random_weights:
            return {"step": name, "skipped": "random weights: no draft would ever be accepted"}
        runs = _serve_all(cfg, lambda specs, arr: serve_static(_speculative_runner(lm), specs, arr, 1))
    else:
        raise ValueError(f"unknown step {name!r}")
    return {"step": name, "label": lm.label, "dtype": dtype, "notes": notes, "weights_mb": weights,
            "perplexity": quality, "gpu_peak_mb": gpu_peak_mb(device), "runs": runs}


def _traced(engine):
    """serve(specs, arrivals) over our engine -> (records, duration, its stalls)."""
    def serve(specs, arrivals):
        stalls = {}
        return (*serve_continuous(engine, specs, arrivals, stalls), stalls)
    return serve


def _tune(lm: LoadedModel, cfg: StepConfig, kv_cache_dtype: str = "auto") -> tuple[int, int]:
    """The (max_num_seqs, max_num_batched_tokens) with the highest offline output throughput on the workload."""
    if len(cfg.tuning) == 1:  # nothing to compare: skip building (on a GPU: capturing) an engine to measure it
        return cfg.tuning[0]
    best, best_tput = cfg.tuning[0], -1.0
    zero = [0.0] * len(cfg.specs)
    for setting in cfg.tuning:
        engine = _engine(lm, cfg, *setting, kv_cache_dtype)
        records, duration = serve_continuous(engine, cfg.specs, zero)
        tput = sum(r.output_len for r in records if r.success) / duration
        if tput > best_tput:
            best, best_tput = setting, tput
        del engine, records  # one engine's KV cache at a time (on a GPU each takes most of the free memory)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return best


def _run_vllm(cfg: StepConfig, dtype: str) -> dict:
    """vLLM offline at rate inf only: its offline API takes every request at once (finite rates: its server)."""
    from benchmarks.backends.vllm_offline import VLLMOfflineBackend

    max_len = max(s.prompt_len + s.output_len for s in cfg.specs) + 16  # as our engine's
    backend = VLLMOfflineBackend(cfg.model, dtype, max_model_len=max_len, seed=cfg.seed,
                                 random_weights=cfg.random_weights)
    runs = []
    for rate in cfg.rates:
        if not math.isinf(rate):
            continue
        t0 = time.perf_counter()
        records = backend.run_batch(cfg.specs)
        duration = max((r.start_s + r.e2el_s for r in records if r.success), default=time.perf_counter()) - t0
        runs.append(_run_record(rate, cfg, records, duration))
    import vllm

    weights = "RANDOM weights (speed only)" if cfg.random_weights else "trained weights"
    return {"step": "vllm", "label": f"{cfg.model} [vLLM {vllm.__version__}, {weights}, {dtype}]", "dtype": dtype,
            "notes": "offline API: measured at rate inf only", "weights_mb": None, "perplexity": None,
            "gpu_peak_mb": backend.peak_memory_mb(), "runs": runs}
