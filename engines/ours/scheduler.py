"""Continuous batching: every step, decide which sequences run and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first: a decoding sequence needs one
token, a sequence still in prefill gets the next chunk of its prompt (chunked prefill). Whatever budget is left
admits waiting requests, so prefills and decodes share one forward pass and a new request never waits for the
batch to drain. When the pool has no block for a running sequence, the most recently admitted running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the queue, keeping the tokens it has
generated; when readmitted it recomputes them (often from the prefix cache) and carries on. No request is lost.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engines.ours.block_manager import BlockManager
from engines.ours.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """Sequences to run this step, each with the number of its tokens to run (1 for a decode)."""
    seqs: list[Sequence]
    num_tokens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0     # of which found there (not recomputed)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False

        # 1. Running sequences, oldest first: one token each for decodes, the next chunk for unfinished prefills.
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            if seq.awaiting_last_token:
                continue  # done once its last token arrives (async scheduling): nothing more to run
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n):
                # Out of blocks: preempt the newest running sequence (possibly this one) and retry.
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n

        # 2. Admit waiting requests while budget, sequence slots and blocks last (not in a step that had to preempt:
        #    memory is short, admitting more would only cause more preemption).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            self.block_manager.take_cached_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.ensure_slots(seq, seq.num_computed_tokens + n):
                self.block_manager.free(seq)  # hand back the prefix blocks it took; try again next step
                break
            self.waiting.popleft()
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free a finished or aborted sequence's blocks and drop it from whichever queue holds it."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
