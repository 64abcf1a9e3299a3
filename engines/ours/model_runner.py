"""Runs one scheduled batch through the shared model: flatten, attend through block tables, sample.

All tokens of a step (prefill chunks and decodes of every sequence) go through the model in ONE forward pass as a
single row [1, N]: the linear layers see N tokens at once whatever sequence they belong to, and only attention needs
to know the sequence boundaries, which the paged cache gets from the metadata built here.
"""
from __future__ import annotations

import torch

from core.generate import sample
from core.model import Transformer
from engines.ours.paged_cache import AttentionMetadata, PagedKVCache, build_group
from engines.ours.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.config
        self.block_size = block_size
        self.cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  self.dtype, self.device)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Flat token ids [N] and positions [N], the cache's metadata, and the flat index of each sampled token."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_index: list[int] = []
        decode_rows, prefill_rows = [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start, offset = seq.num_computed_tokens, len(ids)
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if start + n == seq.num_tokens:  # the chunk reaches the last known token: sample the next one
                sample_index.append(len(ids) - 1)
            (decode_rows if n == 1 else prefill_rows).append((start, n, offset, table))
        # Decodes share one padded attention call; each prefill chunk gets its own (no padding to the longest chunk).
        groups = [build_group(bs, decode_rows, self.device)] if decode_rows else []
        groups += [build_group(bs, [row], self.device) for row in prefill_rows]
        self.cache.metadata = AttentionMetadata(torch.tensor(slots, device=self.device), groups)
        dev = self.device
        return torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), sample_index

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int]:
        """Run the batch; return one new token per sequence whose prompt is now fully computed, in batch order."""
        ids, positions, sample_index = self.prepare(batch)
        hidden = self.model.hidden_states(ids[None], positions[None], self.cache)[0]
        if not sample_index:
            return []
        logits = self.model.lm_head(hidden[torch.tensor(sample_index, device=self.device)])
        sampling = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens + n == s.num_tokens]
        return self.sample(logits, sampling)

    def sample(self, logits: torch.Tensor, seqs: list) -> list[int]:
        """Greedy rows in one argmax; sampled rows one by one with each request's own seeded generator."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                tokens[i] = int(sample(logits[i:i + 1], seq.params, seq.generator)[0])
        return tokens
