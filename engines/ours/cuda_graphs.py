"""CUDA graphs of our engine's steps: the model forward captured once per padded size, replayed every step.

A small model's step is hundreds of kernel launches that each take longer to issue than to run; a graph replay
issues them all at once. A graph fixes every shape and address, so each step's inputs are copied into static
buffers, padded up to the next captured size; padding tokens write their keys to a scratch block outside the pool.

- DecodeGraphs: steps that only decode (one token per sequence), per padded batch size 1, 2, 4, 8, 16, 32, 48, ...;
  attention is the split-K decode kernel (triton_attention.py).
- MixedGraphs: any step, prefill chunks and decodes together, per padded token count 32, 64, ... up to the
  scheduler's token budget; attention is the unified kernel (triton_unified_attention.py), whose work list (the
  query-tile table) is a static buffer too, padded with empty tiles. Without these, every step that carried a
  prefill chunk ran eagerly: on an H100 with SmolLM2-135M, 5% of the steps took 43% of the serving time.

Off CUDA nothing is captured and `run` calls the model on the same static buffers, so the padding logic is testable
on a CPU.
"""
from __future__ import annotations

import torch

from core.generate import graph_capture
from core.model import Transformer
from engines.ours.paged_cache import (AttentionMetadata, DecodeGroup, PagedKVCache, UnifiedGroup,
                                      block_table_tensor, host_tensor)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 32, 48, ... and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def graph_token_counts(max_num_batched_tokens: int) -> list[int]:
    """Token counts to capture mixed steps at: powers of two from 32 to 512, then multiples of 512 (padding wastes
    at most half a step's tokens below 512, a quarter above 1024), and the budget itself."""
    sizes = [s for s in (32, 64, 128, 256) if s < max_num_batched_tokens]
    return sizes + list(range(512, max_num_batched_tokens, 512)) + [max_num_batched_tokens]


class _StepGraphs:
    """Static input buffers for up to `max_tokens` flat tokens, and one captured forward per size in `sizes`."""

    def __init__(self, model: Transformer, cache: PagedKVCache, sizes: list[int], max_tokens: int,
                 scratch_block: int):
        self.dev = next(model.parameters()).device
        self.model, self.cache, self.sizes = model, cache, sizes
        self.scratch_slot = scratch_block * cache.block_size
        self.ids = torch.zeros(1, max_tokens, dtype=torch.long, device=self.dev)
        self.positions = torch.zeros(1, max_tokens, dtype=torch.long, device=self.dev)
        self.slots = torch.full((max_tokens,), self.scratch_slot, dtype=torch.long, device=self.dev)
        self.metadata: dict[int, AttentionMetadata] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def capture(self, pool) -> None:
        if self.dev.type != "cuda":
            return
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.cache.metadata = self.metadata[size]
            self.forward(size)  # warm-up: compilation and allocations happen outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with graph_capture(graph, pool=pool):
                self.hidden[size] = self.forward(size)
            self.graphs[size] = graph
        self.cache.metadata = None

    def forward(self, size: int) -> torch.Tensor:
        return self.model.hidden_states(self.ids[:, :size], self.positions[:, :size], self.cache)[0]

    def host(self, data, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Step inputs on the host, pinned on a GPU: copied in without waiting for the step still running."""
        return host_tensor(data, dtype, self.dev)

    def load(self, ids: list[int], positions: list[int], slots: list[int], fill=None) -> int:
        """Copy a step's flat inputs in; reset the padding up to the size that will run; return that size.
        fill: (flat indices, token ids), both on the device: inputs that come from the previous step's samples."""
        n = len(ids)
        size = next(s for s in self.sizes if s >= n)
        self.ids[0, :n].copy_(self.host(ids), non_blocking=True)
        if fill is not None:
            self.ids[0, fill[0]] = fill[1]
        self.positions[0, :n].copy_(self.host(positions), non_blocking=True)
        self.slots[:n].copy_(self.host(slots), non_blocking=True)
        self.slots[n:size] = self.scratch_slot  # rows a larger step left behind must not write into its blocks
        return size

    def replay(self, size: int, n: int) -> torch.Tensor:
        """Hidden states [n, hidden] of the first n tokens."""
        if self.graphs:
            self.graphs[size].replay()
            return self.hidden[size][:n]
        self.cache.metadata = self.metadata[size]
        return self.forward(size)[:n]


class DecodeGraphs(_StepGraphs):
    """Decode-only steps of B <= max_num_seqs sequences."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_num_seqs: int, max_blocks: int,
                 scratch_block: int, pool=None):
        super().__init__(model, cache, graph_batch_sizes(max_num_seqs), max_num_seqs, scratch_block)
        n = max_num_seqs
        self.scratch_block = scratch_block
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=self.dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=self.dev)
        index = torch.arange(n, device=self.dev)
        self.metadata = {size: AttentionMetadata(self.slots[:size], [DecodeGroup(
            index[:size], self.tables[:size], self.seq_lens[:size])], [], []) for size in self.sizes}
        self.capture(pool)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            fill=None) -> torch.Tensor:
        b = len(ids)
        size = self.load(ids, positions, slots, fill)
        padded = block_table_tensor(tables, self.scratch_block)
        self.tables[:b, :padded.shape[1]].copy_(self.host(padded, torch.int32), non_blocking=True)
        self.seq_lens[:b].copy_(self.host([p + 1 for p in positions], torch.int32), non_blocking=True)
        if size > b:  # padding rows: the scratch block, one key
            self.tables[b:size, 0] = self.scratch_block
            self.seq_lens[b:size] = 1
        return self.replay(size, b)


class MixedGraphs(_StepGraphs):
    """Any step of N <= max_num_batched_tokens tokens over at most max_num_seqs sequences."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_num_batched_tokens: int, max_num_seqs: int,
                 max_blocks: int, scratch_block: int, pool=None):
        from engines.ours.triton_unified_attention import max_query_tiles

        sizes = graph_token_counts(max_num_batched_tokens)
        super().__init__(model, cache, sizes, sizes[-1], scratch_block)
        self.tables = torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=self.dev)
        self.tiles = {size: torch.zeros(max_query_tiles(size, min(size, max_num_seqs)), 4, dtype=torch.int32,
                                        device=self.dev) for size in self.sizes}
        self.metadata = {size: AttentionMetadata(self.slots[:size], [], [], [], UnifiedGroup(
            self.tables, self.tiles[size])) for size in self.sizes}
        self.capture(pool)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            chunks: list[tuple[int, int, int, int]], fill=None) -> torch.Tensor:
        """chunks: (flat_start, length, first_position, table_row) per sequence, as build_query_tiles takes them."""
        from engines.ours.triton_unified_attention import build_query_tiles

        size = self.load(ids, positions, slots, fill)
        padded = block_table_tensor(tables)
        self.tables[:len(tables), :padded.shape[1]].copy_(self.host(padded, torch.int32), non_blocking=True)
        tiles = self.tiles[size]
        tiles.copy_(self.host(build_query_tiles(chunks, num_tiles=len(tiles)), torch.int32), non_blocking=True)
        return self.replay(size, len(ids))
