"""The engine loop: requests in, one scheduled forward pass per `step()`, tokens out. The server drives this."""
from __future__ import annotations

import time

import torch

from core.errors import UserError
from core.generate import SamplingParams
from core.loading import LoadedModel, load_model
from engines.ours.block_manager import BlockManager
from engines.ours.model_runner import LaunchedStep, ModelRunner
from engines.ours.outputs import RequestOutput
from engines.ours.scheduler import ScheduledBatch, Scheduler
from engines.ours.sequence import PLACEHOLDER, Sequence

GiB = 1 << 30
MAX_LOGPROBS = 20  # most likely tokens a request may ask log-probabilities of, per output token (vLLM's default)


KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}  # vLLM's names


def kv_cache_blocks(lm: LoadedModel, block_size: int, num_kv_blocks: int | None, kv_cache_memory_gb: float | None,
                    gpu_memory_utilization: float, kv_dtype: torch.dtype | None = None) -> int:
    """How many blocks the pool gets: given outright, from a memory budget in GiB, or (GPU) from the share of GPU
    memory the engine may use minus what is already taken (weights, other processes) and room for activations."""
    if num_kv_blocks is not None:
        return num_kv_blocks
    p = next(lm.model.parameters())
    bytes_per_block = block_size * lm.model.config.kv_bytes_per_token((kv_dtype or p.dtype).itemsize)
    if kv_cache_memory_gb is None and p.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(p.device)
        activations = 2 * GiB  # logits and MLP activations of one step at the default token budget
        budget = total * gpu_memory_utilization - (total - free) - activations
    else:
        budget = (kv_cache_memory_gb if kv_cache_memory_gb is not None else 1.0) * GiB
    return max(int(budget // bytes_per_block), 0)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache, built on the shared core model.

    model: registry name, HF folder, or an already loaded `LoadedModel`. Memory: `num_kv_blocks` outright, else
    `kv_cache_memory_gb` (default 1 GiB on CPU, like VLLM_CPU_KVCACHE_SPACE), else on GPU `gpu_memory_utilization`.
    On a GPU, steps replay CUDA graphs unless `enforce_eager` (vLLM's name), and the layers are compiled
    first (model_runner.compile_layers; `torch_compile=False` skips it, True forces it anywhere). Each layer's q/k/v
    and gate/up projections run as one matmul each unless `fuse_projections=False` (fused_projections.py); on a GPU
    with uncompiled layers their norms, rope and activation run as fused Triton kernels unless
    `triton_elementwise=False` (triton_elementwise.py).
    `skip_tokenizer_init` (vLLM's name): token-id prompts only and no output text, so random-weight runs need no
    tokenizer files. `async_scheduling` (vLLM's name; default on a GPU): schedule and launch each step while the one
    before it still runs, so the GPU never waits for the host's bookkeeping (see `step`). `kv_cache_dtype` (vLLM's
    name): "auto" stores keys and values in the model's dtype, "fp8" in FP8 e4m3 (paged_cache.PagedKVCache): half
    the bytes per decode step and twice the tokens per GiB, at some precision.
    """

    def __init__(self, model: str | LoadedModel = "smollm2-135m", device: str = "auto", dtype: str | None = None,
                 random_weights: bool = False, max_num_seqs: int = 256, max_model_len: int | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None, kv_cache_memory_gb: float | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, skip_tokenizer_init: bool = False,
                 torch_compile: bool | None = None, fuse_projections: bool = True,
                 async_scheduling: bool | None = None, kv_cache_dtype: str = "auto", triton_elementwise: bool = True):
        self.lm = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, random_weights)
        cfg = self.lm.model.config
        self.skip_tokenizer_init = skip_tokenizer_init
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise UserError(f"max_model_len {self.max_model_len} exceeds the model's context of "
                            f"{cfg.max_position_embeddings}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or block_size < 1:
            raise UserError("max_num_seqs, max_num_batched_tokens and block_size must be at least 1")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise UserError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {kv_cache_dtype!r})")
        kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype]
        num_blocks = kv_cache_blocks(self.lm, block_size, num_kv_blocks, kv_cache_memory_gb, gpu_memory_utilization,
                                     kv_dtype)
        # One sequence of max_model_len tokens must always fit, or a lone long request could never finish.
        if num_blocks * block_size < self.max_model_len:
            raise UserError(f"the KV cache holds {num_blocks} blocks x {block_size} = {num_blocks * block_size} "
                            f"tokens, fewer than max_model_len {self.max_model_len}: give it more memory or lower "
                            "max_model_len")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.lm.model, num_blocks, block_size, self.max_model_len, max_num_seqs,
                                  cuda_graph=None if not enforce_eager else False,
                                  torch_compile=torch_compile, max_num_batched_tokens=max_num_batched_tokens,
                                  fuse_projections=fuse_projections, kv_dtype=kv_dtype,
                                  triton_elementwise=triton_elementwise)
        self.requests: dict[str, Sequence] = {}
        self.eos_ids = set(cfg.eos_ids)
        self.async_scheduling = self.runner.device.type == "cuda" if async_scheduling is None else async_scheduling
        self.in_flight: tuple | None = None  # (batch, LaunchedStep, placeholder indices): launched, not collected

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use."""
        return self.lm.tokenizer

    @property
    def label(self) -> str:
        return self.lm.label

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Sequence:
        """Queue a request (text or token ids). It joins the running batch at the next step with room for it."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        if text is not None and self.skip_tokenizer_init:
            raise UserError("this engine was started with skip_tokenizer_init: give prompts as token ids")
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise UserError("every prompt needs at least one token")
        if len(ids) > self.max_model_len:
            raise UserError(f"prompt of {len(ids)} tokens is longer than max_model_len {self.max_model_len}")
        if params.max_tokens < 1:
            raise UserError("max_tokens must be at least 1")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise UserError(f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if request_id is not None and request_id in self.requests:
            raise UserError(f"request id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id, arrival_time, text)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def warm_up(self, prompt_lens: tuple[int, ...] = (3, 17, 100, 400)) -> None:
        """Run a few throwaway requests so that the first compilations happen before the first real request:
        prompts of several lengths, each arriving while the one before decodes, give steps of several token counts
        that mix prefill and decode (torch.compile specialises on the first token count it sees and recompiles,
        now dynamic, at the second). On an H100 a few mixed steps of a run still take 0.7-1 s after this (2-4
        per 400 requests, engines/README.md): something else recompiles or compiles there, not yet found."""
        vocab = self.lm.model.config.vocab_size
        for n in prompt_lens:
            n = max(1, min(n, self.max_model_len - 4))
            self.add_request(None, [(7 * i) % vocab for i in range(1, n + 1)],
                             SamplingParams(max_tokens=4, ignore_eos=True))
            self.step()
        while self.has_unfinished_requests():
            self.step()

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its blocks go back to the pool at once."""
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self._drop_placeholders(seq)
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one forward pass; append the sampled tokens. Returns the requests that got a token.

        Without async scheduling a step waits for its own tokens. With it, the step launched here is collected by
        the next call, so the GPU runs step n while the host schedules and prepares step n+1 and then handles step
        n's tokens (stop checks, outputs, prefix-cache hashes): vLLM V1's async scheduling. It can schedule before
        it knows the tokens because every count it needs is known: a sequence that sampled in step n decodes one
        token in step n+1 whatever that token is, so a PLACEHOLDER holds its place and the real token goes into
        step n+1's input on the device. A sequence that stops on a token of step n has one more token computed in
        step n+1, which is dropped; one that reaches max_tokens is not scheduled again (awaiting_last_token)."""
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch.seqs else None
        if not self.async_scheduling:
            return self._collect(*launched) if launched else []
        previous, self.in_flight = self.in_flight, launched
        return self._collect(*previous) if previous else []

    def _launch(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, LaunchedStep, list[int]]:
        """Queue the batch on the device, then count its tokens as computed and give each sequence that samples a
        placeholder for its token, so that the next schedule() sees the state this step will leave."""
        step = self.runner.launch(batch, self.in_flight[1] if self.in_flight else None)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
        places = []
        for seq in step.seqs:
            places.append(seq.num_tokens)
            seq.token_ids.append(PLACEHOLDER)
            seq.awaiting_last_token = self._length_reached(seq, seq.num_tokens)
        return batch, step, places

    def _collect(self, batch: ScheduledBatch, step: LaunchedStep, places: list[int]) -> list[RequestOutput]:
        """Wait for a launched step's tokens and put them in place of their placeholders; finish what stops."""
        tokens = step.tokens()
        now = time.perf_counter()
        for seq, token, i, logprobs in zip(step.seqs, tokens, places, step.token_logprobs()):
            if not seq.is_finished:  # else it was aborted, or stopped by its token of an earlier step
                seq.token_ids[i] = token
                if logprobs is not None:
                    seq.logprobs.append(logprobs)
        for seq in batch.seqs:  # after the tokens are in: the hashes cover them
            if not seq.is_finished:
                self.block_manager.register_computed_blocks(seq)
        outputs = []
        for seq, token, i in zip(step.seqs, tokens, places):
            if seq.is_finished:
                continue
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            seq.metrics.token_times.append(now)
            reason = self._finish_reason(seq, token, i + 1)
            if reason:
                self._drop_placeholders(seq)
                self.scheduler.finish(seq, reason)
                seq.metrics.finished_time = now
                self.requests.pop(seq.request_id, None)
            outputs.append(self.output(seq, i + 1))
        return outputs

    @staticmethod
    def _drop_placeholders(seq: Sequence) -> None:
        if PLACEHOLDER in seq.token_ids[seq.num_prompt_tokens:]:
            del seq.token_ids[seq.token_ids.index(PLACEHOLDER, seq.num_prompt_tokens):]

    def _length_reached(self, seq: Sequence, num_tokens: int) -> bool:
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.max_model_len

    def _finish_reason(self, seq: Sequence, token: int, num_tokens: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        return "length" if self._length_reached(seq, num_tokens) else None

    def output(self, seq: Sequence, num_tokens: int | None = None) -> RequestOutput:
        """The request's state with its first `num_tokens` tokens (default all): later ones may be placeholders."""
        out = seq.token_ids[seq.num_prompt_tokens:num_tokens]
        done = seq.is_finished and not self.skip_tokenizer_init
        text = self.tokenizer.decode(out, skip_special_tokens=True) if done else ""
        logprobs = None if seq.logprobs is None else seq.logprobs[:len(out)]
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, out, text, seq.is_finished,
                             seq.finish_reason, seq.metrics, logprobs)

    def stats(self) -> dict:
        """Gauges for /metrics and for the teaching scripts."""
        bm = self.block_manager
        return {"num_requests_running": len(self.scheduler.running),
                "num_requests_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": bm.usage(), "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
                "num_preemptions": self.scheduler.num_preemptions,
                "prefix_cache_queries": self.scheduler.prefix_queries, "prefix_cache_hits": self.scheduler.prefix_hits}
