"""Runs one scheduled batch through the shared model: flatten, attend through block tables, sample.

All tokens of a step (prefill chunks and decodes of every sequence) go through the model in ONE forward pass as a
single row [1, N]: the linear layers see N tokens at once whatever sequence they belong to, and only attention needs
to know the sequence boundaries, which the paged cache gets from the metadata built here.

On a GPU, steps that only decode replay a CUDA graph captured for the next batch size up (1, 2, 4, 8, then
multiples of 16): the step's hundreds of kernel launches become one, which is most of the time of a small model's
decode step. Padding rows of a graph write to a scratch block outside the pool and attend to it alone.

A graph removes launch overhead but not the kernels themselves: eager PyTorch runs each RMSNorm, RoPE and SwiGLU as
a handful of tiny elementwise kernels, some 40 per layer of which only 7 are the matmuls that read the weights.
`compile_layers` lets torch.compile fuse those into a few kernels per layer, with the paged attention call left
out of the compiled code (see PagedKVCache.attend) so that one compiled layer serves every step.
"""
from __future__ import annotations

import torch

from core.generate import graph_capture, sample
from core.model import Transformer
from engines.ours.paged_cache import (AttentionMetadata, CachedPrefillGroup, DecodeGroup, FreshPrefillGroup,
                                      PagedKVCache, cached_prefill_mask)
from engines.ours.scheduler import ScheduledBatch


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 32, 48, ... and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def compile_layers(model: Transformer) -> None:
    """torch.compile every decoder layer in place: each compiles to two pieces, before and after the attention
    call, shared by all layers (the layer index is a dynamic int, not one compilation per layer) and by all
    batch sizes (dynamic token counts after the first recompilation)."""
    import torch._dynamo
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    for layer in model.layers:
        layer.compile()


class DecodeGraphs:
    """CUDA graphs of a decode step (model forward to final hidden states) for a set of padded batch sizes.

    Inputs live in static buffers sized for the largest batch; `run` copies a step's inputs in, resets the padding
    rows and replays the smallest graph that fits. Off CUDA nothing is captured and `run` calls the model on the
    same static buffers instead, so the buffer and padding logic is testable on a CPU.
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, max_num_seqs: int, max_blocks: int,
                 scratch_block: int):
        dev = next(model.parameters()).device
        n = max_num_seqs
        self.sizes = graph_batch_sizes(n)
        self.scratch_block, self.block_size = scratch_block, cache.block_size
        self.ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_block * cache.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.index = torch.arange(n, device=dev)
        self.model, self.cache = model, cache
        self.metadata = {size: AttentionMetadata(self.slots[:size], [DecodeGroup(
            self.index[:size], self.tables[:size], self.seq_lens[:size])], [], []) for size in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        if dev.type != "cuda":
            return
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            cache.metadata = self.metadata[size]
            model.hidden_states(self.ids[:, :size], self.positions[:, :size], cache)  # warm-up (compilation)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph, pool=pool):
                self.hidden[size] = model.hidden_states(self.ids[:, :size], self.positions[:, :size], cache)[0]
            self.graphs[size] = graph
        cache.metadata = None

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            seq_lens: list[int]) -> torch.Tensor:
        """Hidden states [B, hidden] of B decode tokens (B <= max_size)."""
        b = len(ids)
        size = next(s for s in self.sizes if s >= b)
        width = max(len(t) for t in tables)
        flat = [x for t in tables for x in t + [self.scratch_block] * (width - len(t))]
        self.ids[0, :b].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[0, :b].copy_(torch.tensor(positions), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots), non_blocking=True)
        self.tables[:b, :width].copy_(torch.tensor(flat, dtype=torch.int32).view(b, width), non_blocking=True)
        self.seq_lens[:b].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        if size > b:  # rows a larger step left behind: back to padding (scratch slot, one key)
            self.slots[b:size] = self.scratch_block * self.block_size
            self.tables[b:size, 0] = self.scratch_block
            self.seq_lens[b:size] = 1
        if self.graphs:
            self.graphs[size].replay()
            return self.hidden[size][:b]
        self.cache.metadata = self.metadata[size]
        return self.model.hidden_states(self.ids[:, :size], self.positions[:, :size], self.cache)[0][:b]


class ModelRunner:
    """Owns the paged cache; turns a ScheduledBatch into one forward pass and the sampled tokens.

    cuda_graph: replay decode-only steps from CUDA graphs (default: on CUDA; on a CPU, True runs the same
    static-buffer path eagerly, for tests). use_triton: Triton decode attention (default: on CUDA). torch_compile:
    compile the decoder layers first (default: wherever CUDA graphs are on; it changes the model in place, and the
    graphs then capture the compiled kernels).
    The pool gets one extra block beyond the allocator's, a scratch block for graph padding.
    """

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_model_len: int = 2048,
                 max_num_seqs: int = 256, cuda_graph: bool | None = None, use_triton: bool | None = None,
                 torch_compile: bool | None = None):
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.config
        self.block_size = block_size
        on_cuda = self.device.type == "cuda"
        self.cache = PagedKVCache(cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  self.dtype, self.device, use_triton=on_cuda if use_triton is None else use_triton)
        use_graphs = on_cuda if cuda_graph is None else cuda_graph
        if (use_graphs and on_cuda) if torch_compile is None else torch_compile:
            compile_layers(model)
        self.graphs = None
        if use_graphs:
            max_blocks = -(-max_model_len // block_size)
            with torch.inference_mode():
                self.graphs = DecodeGraphs(model, self.cache, max_num_seqs, max_blocks, scratch_block=num_blocks)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Flat token ids [N] and positions [N], the cache's metadata, and the flat index of each sampled token."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_index: list[int] = []
        decode_rows, fresh_rows, cached = [], {}, []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start, offset = seq.num_computed_tokens, len(ids)
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if start + n == seq.num_tokens:  # the chunk reaches the last known token: sample the next one
                sample_index.append(len(ids) - 1)
            if n == 1:
                decode_rows.append((offset, start + 1, table))
            elif start == 0:
                fresh_rows.setdefault(n, []).append(offset)
            else:
                num_blocks = -(-(start + n) // bs)
                cached.append(CachedPrefillGroup(
                    torch.arange(offset, offset + n, device=dev),
                    torch.tensor(table[:num_blocks], device=dev)[None],
                    cached_prefill_mask(bs, start, n, num_blocks).to(dev)))
        # The Triton kernel reads only each sequence's own blocks, so one group; the gather path pads every row to
        # the group's longest, so there decodes are grouped by length (widths within 2x of each other).
        by_width: dict[int, list] = {}
        for row in decode_rows:
            key = 0 if self.cache.use_triton else len(row[2]).bit_length()
            by_width.setdefault(key, []).append(row)
        decode = []
        for rows in by_width.values():
            offsets, seq_lens, tables = zip(*rows)
            width = max(len(t) for t in tables)
            flat = [x for t in tables for x in t + [0] * (width - len(t))]
            decode.append(DecodeGroup(torch.tensor(offsets, device=dev),
                                      torch.tensor(flat, dtype=torch.int32).view(len(tables), width).to(dev),
                                      torch.tensor(seq_lens, dtype=torch.int32, device=dev)))
        fresh = [FreshPrefillGroup(torch.tensor(offs, device=dev)[:, None] + torch.arange(n, device=dev), n)
                 for n, offs in fresh_rows.items()]
        self.cache.metadata = AttentionMetadata(torch.tensor(slots, device=dev), decode, fresh, cached)
        return torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), sample_index

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int]:
        """Run the batch; return one new token per sequence whose prompt is now fully computed, in batch order."""
        sampling = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens + n == s.num_tokens]
        if self.graphs and all(n == 1 for n in batch.num_tokens) and len(batch.seqs) <= self.graphs.max_size:
            hidden = self._run_graph(batch)
            sample_index = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens))
                            if s.num_computed_tokens + n == s.num_tokens]
        else:
            ids, positions, sample_index = self.prepare(batch)
            hidden = self.model.hidden_states(ids[None], positions[None], self.cache)[0]
        if not sample_index:
            return []
        if len(sample_index) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_index, device=self.device)]
        return self.sample(self.model.lm_head(hidden), sampling)

    def _run_graph(self, batch: ScheduledBatch) -> torch.Tensor:
        bs = self.block_size
        ids, positions, slots, tables, seq_lens = [], [], [], [], []
        for seq in batch.seqs:
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            tables.append(seq.block_table)
            seq_lens.append(p + 1)
        return self.graphs.run(ids, positions, slots, tables, seq_lens)

    def sample(self, logits: torch.Tensor, seqs: list) -> list[int]:
        """Greedy rows in one argmax; sampled rows one by one with each request's own seeded generator."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                tokens[i] = int(sample(logits[i:i + 1], seq.params, seq.generator)[0])
        return tokens
