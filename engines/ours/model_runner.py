"""Runs one scheduled batch through the shared model: flatten, attend through block tables, sample.

All tokens of a step (prefill chunks and decodes of every sequence) go through the model in ONE forward pass as a
single row [1, N]: the linear layers see N tokens at once whatever sequence they belong to, and only attention needs
to know the sequence boundaries, which the paged cache gets from the metadata built here.

On a GPU every step replays a CUDA graph (cuda_graphs.py): decode-only steps one captured for the next batch size up,
steps that carry prefill chunks one captured for the next token count up, with the unified attention kernel. The
step's hundreds of kernel launches become one, which is most of the time of a small model's step.

A graph removes launch overhead but not the kernels themselves: eager PyTorch runs each RMSNorm, RoPE and SwiGLU as
a handful of tiny elementwise kernels, some 40 per layer of which only 7 are the matmuls that read the weights.
`compile_layers` lets torch.compile fuse those into a few kernels per layer, with the paged attention call left
out of the compiled code (see PagedKVCache.attend) so that one compiled layer serves every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.generate import sample
from core.model import Transformer
from engines.ours import cpu_linear, fused_projections
from engines.ours.cuda_graphs import DecodeGraphs, MixedGraphs
from engines.ours.paged_cache import (AttentionMetadata, CachedPrefillGroup, DecodeGroup, FreshPrefillGroup,
                                      PagedKVCache, UnifiedGroup, block_table_tensor, cached_prefill_mask, to_device)
from engines.ours.scheduler import ScheduledBatch
from engines.ours.sequence import PLACEHOLDER, Sequence


def compile_layers(model: Transformer) -> None:
    """torch.compile every decoder layer in place: each compiles to two pieces, before and after the attention
    call, shared by all layers (the layer index is a dynamic int, not one compilation per layer) and by all
    batch sizes (dynamic token counts after the first recompilation)."""
    import torch._dynamo
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    for layer in model.layers:
        layer.compile()


def packed_lm_head(model: Transformer) -> torch.nn.Module:
    """On a CPU, the LM head with its weight prepacked for oneDNN (cpu_linear.py), as the served layers' projections.

    A decode step multiplies a few dozen rows by the 49k x 576 LM head of SmolLM2: on the 2-core development VM
    33 ms for 32 rows through PyTorch's default CPU GEMM, 13 ms through oneDNN (2026-12-04). A packed copy (113 MB
    for SmolLM2 in float32): the model, whose embedding shares the weight, stays as it is."""
    return cpu_linear.packed(model.lm_head)


@dataclass
class LaunchedStep:
    """A step whose forward pass and sampling are queued on the device; its tokens come back with `tokens()`.

    seqs: the sequences that sample in this step, one token each, in row order of `sampled` (int64, on the device).
    `host` is its copy in pinned memory and `done` the event after that copy: on a GPU, waiting for the tokens waits
    for this step alone, and the host is free to prepare the next step until then. `logprobs`, when a sequence asked
    for them: (chosen token's log-probability [rows], top log-probabilities [rows, k], their token ids [rows, k]),
    on the device, read after the tokens."""
    seqs: list[Sequence]
    sampled: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None = None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()

    def token_logprobs(self) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Per row, what Sequence.logprobs records for its token (None for rows that did not ask); after tokens()."""
        if self.logprobs is None:
            return [None] * len(self.seqs)
        chosen, top_values, top_ids = (t.tolist() for t in self.logprobs)
        return [(chosen[i], list(zip(top_ids[i][:seq.params.logprobs], top_values[i][:seq.params.logprobs])))
                if seq.params.logprobs is not None else None for i, seq in enumerate(self.seqs)]


class ModelRunner:
    """Owns the paged cache; turns a ScheduledBatch into one forward pass and the sampled tokens.

    cuda_graph: replay steps from CUDA graphs (default: on CUDA; on a CPU, True runs the same static-buffer paths
    eagerly, for tests). use_triton: Triton attention kernels (default: on CUDA); mixed steps are graphed only with
    them. torch_compile: compile the decoder layers first (default: wherever CUDA graphs are on; it changes the
    served model in place, and the graphs then capture the compiled kernels). triton_elementwise: uncompiled on
    CUDA, the fused layers' norms, rope and activation run as the kernels of triton_elementwise.py.
    fuse_projections: serve a copy of the model whose layers compute q|k|v and gate|up in one matmul each
    (fused_projections.py; quantized projections too, their packed codes and scales stacked by rows). kv_dtype: the
    KV pools' dtype if not the model's (FP8). The pool gets one extra block beyond the allocator's, a scratch block
    for graph padding.
    """

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_model_len: int = 2048,
                 max_num_seqs: int = 256, cuda_graph: bool | None = None, use_triton: bool | None = None,
                 torch_compile: bool | None = None, max_num_batched_tokens: int = 2048,
                 fuse_projections: bool = True, kv_dtype: torch.dtype | None = None,
                 triton_elementwise: bool = True):
        # Before compiling and capturing: the compiled layers and the graphs are those of the model actually served.
        self.model = model = fused_projections.fuse_projections(model) if fuse_projections else model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.config
        self.block_size = block_size
        on_cuda = self.device.type == "cuda"
        self.cache = PagedKVCache(cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  self.dtype, self.device, use_triton=on_cuda if use_triton is None else use_triton,
                                  kv_dtype=kv_dtype)
        use_graphs = on_cuda if cuda_graph is None else cuda_graph
        if (use_graphs and on_cuda) if torch_compile is None else torch_compile:
            compile_layers(model)
        elif on_cuda and triton_elementwise and isinstance(model, fused_projections.FusedTransformer):
            model.use_triton_elementwise()  # by hand, the elementwise fusion that compiling would have done
        elif self.device.type == "cpu" and isinstance(model, fused_projections.FusedTransformer):
            cpu_linear.pack_layers(model)  # a serving copy only (inductor cannot compile the packed weights)
        self.lm_head = packed_lm_head(model) if self.device.type == "cpu" else model.lm_head
        self.graphs = self.mixed_graphs = None
        if use_graphs:
            max_blocks = -(-max_model_len // block_size)
            pool = torch.cuda.graph_pool_handle() if on_cuda else None  # one memory pool for every graph
            with torch.inference_mode():
                if self.cache.use_triton:  # captured first: its largest step needs the most memory
                    self.mixed_graphs = MixedGraphs(model, self.cache, max_num_batched_tokens, max_num_seqs,
                                                    max_blocks, num_blocks, pool)
                self.graphs = DecodeGraphs(model, self.cache, max_num_seqs, max_blocks, num_blocks, pool)
        if on_cuda:
            self.warm_up_lm_head(max_num_seqs)

    def warm_up_lm_head(self, max_rows: int) -> None:
        """Run the LM head once at every row count a step can sample (1..max_num_seqs). It runs outside the graphs,
        and a quantized head's Triton kernels compile on the first call of each row-count bucket (and autotune, at
        one row): seconds that would otherwise land in the middle of serving. On an H100 (7B shape, INT4 head) the
        first one-row step took 2.3 s, the first prefill steps 0.7-0.8 s each (optimization README)."""
        hidden = torch.zeros(max_rows, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            for rows in range(1, max_rows + 1):
                self.lm_head(hidden[:rows])

    @staticmethod
    def flatten(batch: ScheduledBatch, block_size: int):
        """The step's tokens as flat lists: ids, positions, pool slots; per sequence its block table and its chunk
        (flat_start, length, first_position, row); the flat index of each token to sample after; and the
        sequences whose last token is a PLACEHOLDER (sampled by the step still running), with its flat index."""
        ids, positions, slots, tables, chunks, sample_index, pending = [], [], [], [], [], [], []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start, table = seq.num_computed_tokens, seq.block_table
            chunks.append((len(ids), n, start, row))
            tables.append(table)
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
            if start + n == seq.num_tokens:  # the chunk reaches the last known token: sample the next one
                sample_index.append(len(ids) - 1)
            if ids[-1] == PLACEHOLDER:  # only ever a sequence's last token, so only ever the last of its chunk
                pending.append((len(ids) - 1, seq))
        return ids, positions, slots, tables, chunks, sample_index, pending

    def prepare(self, ids, positions, slots, tables, chunks) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager steps: flat ids [N] and positions [N] on the device, and the cache's metadata. With Triton, one
        unified attention call; otherwise (the reference path) groups of decodes, fresh and continued prefills."""
        dev, bs = self.device, self.block_size
        slot_mapping = to_device(slots, dev)
        if self.cache.use_triton and any(n > 1 for _, n, _, _ in chunks):
            from engines.ours.triton_unified_attention import build_query_tiles
            unified = UnifiedGroup(to_device(block_table_tensor(tables), dev, torch.int32),
                                   to_device(build_query_tiles(chunks), dev, torch.int32))
            self.cache.metadata = AttentionMetadata(slot_mapping, [], [], [], unified)
            return to_device(ids, dev), to_device(positions, dev)
        decode_rows, fresh_rows, cached = [], {}, []
        for (offset, n, start, row), table in zip(chunks, tables):
            if n == 1:
                decode_rows.append((offset, start + 1, table))
            elif start == 0:
                fresh_rows.setdefault(n, []).append(offset)
            else:
                num_blocks = -(-(start + n) // bs)
                cached.append(CachedPrefillGroup(
                    torch.arange(offset, offset + n, device=dev),
                    to_device(table[:num_blocks], dev)[None],
                    to_device(cached_prefill_mask(bs, start, n, num_blocks), dev, torch.bool)))
        # The Triton kernel reads only each sequence's own blocks, so one group; the gather path pads every row to
        # the group's longest, so there decodes are grouped by length (widths within 2x of each other).
        by_width: dict[int, list] = {}
        for r in decode_rows:
            key = 0 if self.cache.use_triton else len(r[2]).bit_length()
            by_width.setdefault(key, []).append(r)
        decode = []
        for rows in by_width.values():
            offsets, seq_lens, group_tables = zip(*rows)
            group_tables = to_device(block_table_tensor(group_tables), dev, torch.int32)
            decode.append(DecodeGroup(to_device(offsets, dev), group_tables, to_device(seq_lens, dev, torch.int32)))
        fresh = [FreshPrefillGroup(to_device(offs, dev)[:, None] + torch.arange(n, device=dev), n)
                 for n, offs in fresh_rows.items()]
        self.cache.metadata = AttentionMetadata(slot_mapping, decode, fresh, cached)
        return to_device(ids, dev), to_device(positions, dev)

    def run(self, batch: ScheduledBatch) -> list[int]:
        """Run the batch; return one new token per sequence whose prompt is now fully computed, in batch order."""
        return self.launch(batch).tokens()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the batch's forward pass and sampling on the device without waiting for them.

        `previous`: the step still running, whose sampled tokens some of this batch's sequences decode next (their
        last token is a PLACEHOLDER): those inputs are copied from its token tensor on the device, in stream order
        after it, so the host never waits for them."""
        sampling = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens + n == s.num_tokens]
        ids, positions, slots, tables, chunks, sample_index, pending = self.flatten(batch, self.block_size)
        fill = None
        if pending:
            row_of = {id(seq): row for row, seq in enumerate(previous.seqs)} if previous else {}
            if any(id(seq) not in row_of for _, seq in pending):
                raise RuntimeError("a sequence's input token is a placeholder that no running step will fill")
            rows = to_device([row_of[id(seq)] for _, seq in pending], self.device)
            fill = (to_device([i for i, _ in pending], self.device), previous.sampled[rows])
        if self.graphs and len(ids) == len(tables) and len(ids) <= self.graphs.max_size:  # decodes only
            hidden = self.graphs.run(ids, positions, slots, tables, fill)
        elif self.mixed_graphs and len(ids) <= self.mixed_graphs.max_size:
            hidden = self.mixed_graphs.run(ids, positions, slots, tables, chunks, fill)
        else:
            flat_ids, flat_positions = self.prepare(ids, positions, slots, tables, chunks)
            if fill is not None:
                flat_ids[fill[0]] = fill[1]
            hidden = self.model.hidden_states(flat_ids[None], flat_positions[None], self.cache)[0]
        sampled, logprobs = torch.empty(0, dtype=torch.long, device=self.device), None
        if sampling:
            if len(sample_index) < hidden.shape[0]:
                hidden = hidden[to_device(sample_index, self.device)]
            logits = self.lm_head(hidden)
            sampled = self.sample(logits, sampling)
            if any(s.params.logprobs is not None for s in sampling):
                logprobs = self.logprobs(logits, sampled, sampling)
        if self.device.type != "cuda":
            return LaunchedStep(sampling, sampled, sampled, logprobs=logprobs)
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(sampling, sampled, host, done, logprobs)

    @staticmethod
    def logprobs(logits: torch.Tensor, sampled: torch.Tensor, seqs: list[Sequence]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of the raw model distribution (before temperature, top-k, top-p; as vLLM returns them):
        of each row's chosen token, and the largest k of each row, k the most any sequence asked for."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        k = max(s.params.logprobs or 0 for s in seqs)
        top = lp.topk(k, dim=-1)
        return lp.gather(1, sampled[:, None])[:, 0], top.values, top.indices

    def sample(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """Token ids [rows] on the device: greedy rows in one argmax; sampled rows one by one with each request's
        own seeded generator (on the device too: nothing here waits for the GPU)."""
        tokens = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                tokens[i] = sample(logits[i:i + 1], seq.params, seq.generator)[0]
        return tokens
