"""Blocks of the paged KV cache: an allocator with reference counts, block tables, and prefix caching.

The pool holds `num_blocks` physical blocks of `block_size` token slots each. A sequence owns a block table (a list
of physical block ids); token i of the sequence lives in slot i % block_size of block block_table[i // block_size].

Prefix caching: once every slot of a block is computed, the block gets a hash of its tokens chained with the hash
of the block before it, so equal hashes mean equal prefixes. A new sequence whose first full blocks hash the same
reuses those blocks (reference count + 1) and skips computing them. A block whose count drops to zero goes back to
the free list but keeps its contents and hash until it is handed out again, so a later request can still hit it;
the free list is least-recently-freed first, so cached blocks are evicted oldest first.
"""
from __future__ import annotations

from collections import OrderedDict

from core.errors import UserError
from engines.ours.sequence import Sequence


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """Hash of one full block, chained with its parent's so it stands for the whole prefix up to this block."""
    return hash((parent, tuple(tokens)))


class BlockAllocator:
    """Physical blocks with reference counts; free blocks kept in eviction order (oldest first)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise UserError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: list[int | None] = [None] * num_blocks  # content hash of a full, computed block
        self.cached: dict[int, int] = {}  # hash -> block id, for blocks whose content is still valid

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """A fresh block (ref count 1). Evicts the oldest free block's cached content if it had any."""
        block, _ = self.free.popitem(last=False)
        h = self.hash_of[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.hash_of[block] = None
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more owner of a cached block; a free one is taken back out of the free list."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} released more often than allocated")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None  # most recently freed: evicted last

    def register(self, block: int, h: int) -> None:
        """Mark a full, computed block as reusable under hash h (the first block with a hash keeps it)."""
        self.hash_of[block] = h
        self.cached.setdefault(h, block)

    def lookup(self, h: int) -> int | None:
        return self.cached.get(h)


class BlockManager:
    """Gives sequences the blocks they need, shares cached prefixes, and takes blocks back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def usage(self) -> float:
        """Fraction of blocks in use (cached-but-free blocks count as free, as in vLLM's kv_cache_usage)."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def take_cached_prefix(self, seq: Sequence) -> None:
        """Give a sequence without blocks the cached blocks of its longest cached prefix of full blocks.

        Only blocks before the last token are looked up: the last token must run through the model to give logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        parent = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.allocator.lookup(h)
            if block is None:
                break
            self.allocator.share(block)
            seq.block_table.append(block)
            parent = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens. All or nothing: False if too few blocks are free."""
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        if missing > self.allocator.num_free:
            return False
        for _ in range(max(missing, 0)):
            seq.block_table.append(self.allocator.allocate())
        return True

    def free(self, seq: Sequence) -> None:
        """Return every block of a sequence. Tail blocks go first so they are evicted before the shared head."""
        for block in reversed(seq.block_table):
            self.allocator.release(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def register_computed_blocks(self, seq: Sequence) -> None:
        """After a step: hash the blocks that are now full and computed so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        parent = None
        if seq.num_hashed_blocks:
            parent = self.allocator.hash_of[seq.block_table[seq.num_hashed_blocks - 1]]
        for i in range(seq.num_hashed_blocks, full):
            h = block_hash(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            self.allocator.register(seq.block_table[i], h)
            parent = h
        seq.num_hashed_blocks = max(full, seq.num_hashed_blocks)
