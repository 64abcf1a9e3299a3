"""The paged KV cache: one pool of fixed-size blocks per layer, attention through block tables.

Pool layout per layer: keys and values [num_blocks, block_size, num_kv_heads, head_dim]. The model runner flattens a
step's tokens from every scheduled sequence into one row ([1, N]) and tells the cache, through `AttentionMetadata`,
where each new token goes (`slot_mapping`) and which blocks each sequence reads (its block table). `attend` writes
the new keys/values into their slots, then computes attention in three kinds of group:
- decodes (one query per sequence): on a GPU the Triton kernel reads the pool through the block tables, all
  sequences in one call, and on a CPU a C++ kernel does the same (cpu_attention.py); the reference path (and the
  fallback where that kernel cannot be built) gathers each sequence's blocks into a padded [B, Hkv, S, D] view,
  sequences of similar length together;
- fresh prefills (a chunk starting at position 0, nothing cached before it): plain causal attention over the chunk's
  own keys, no pool reads at all; chunks of equal length share one call;
- continued prefills (a later chunk, or a prompt whose head came from the prefix cache): gather + masked attention.
On a GPU a step that carries prefill chunks uses none of these groups: one call of the unified kernel
(triton_unified_attention.py) attends every token of the step, whatever its kind, with a fixed number of kernels, so
that the whole step can be replayed from a CUDA graph (cuda_graphs.MixedGraphs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.kv_cache import EMPTY, KVCache, attention, causal_mask


@dataclass
class DecodeGroup:
    """token_index: long [B] flat index of each query; block_tables: int32 [B, max_blocks] (entries past a
    sequence's blocks may be anything); seq_lens: int32 [B] keys to attend over, the new one included."""
    token_index: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor


@dataclass
class FreshPrefillGroup:
    """Chunks of equal length `length` that start at position 0: token_index long [B, length]."""
    token_index: torch.Tensor
    length: int


@dataclass
class CachedPrefillGroup:
    """One chunk after cached tokens: queries token_index long [Tq]; block_table long [1, blocks]; mask [1,1,Tq,S]."""
    token_index: torch.Tensor
    block_table: torch.Tensor
    mask: torch.Tensor


@dataclass
class UnifiedGroup:
    """Every token of the step: block_tables int32 [S, W], one row per sequence; tiles int32 [T, 4] from
    triton_unified_attention.build_query_tiles."""
    block_tables: torch.Tensor
    tiles: torch.Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # long [N]: pool slot (block * block_size + offset) of each new token
    decode: list[DecodeGroup]
    fresh: list[FreshPrefillGroup]
    cached: list[CachedPrefillGroup]
    unified: UnifiedGroup | None = None  # set: the unified kernel attends every token, the groups above are empty


def block_table_tensor(tables: list[list[int]], pad: int = 0) -> torch.Tensor:
    """int32 [B, longest table] on the host: each sequence's block table, padded with `pad` (a kernel or gather that
    stops at the sequence's length never reads the padding; a CUDA graph's padding rows point at the scratch block)."""
    width = max(map(len, tables))
    return torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.int32)


def host_tensor(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) as a CPU tensor, in pinned memory when it is bound for a GPU. A copy from pinned
    memory with non_blocking=True is queued on the stream like a kernel; torch.tensor(data, device="cuda") instead
    copies from pageable memory and then synchronizes the stream, so the host would wait for every kernel already
    queued (with async scheduling: the whole step still running)."""
    pin = torch.device(device).type == "cuda"
    if not isinstance(data, torch.Tensor):
        return torch.tensor(data, dtype=dtype, pin_memory=pin)
    return data.to(dtype).pin_memory() if pin else data.to(dtype)


def to_device(data, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """data on `device` without waiting for the GPU (see host_tensor)."""
    return host_tensor(data, dtype, device).to(device, non_blocking=True)


def cached_prefill_mask(block_size: int, start: int, length: int, num_blocks: int) -> torch.Tensor:
    """bool [1, 1, length, num_blocks * block_size] for a chunk of `length` queries at positions start.."""
    query_pos = torch.arange(start, start + length)[None]
    s = torch.arange(num_blocks * block_size)[None]
    key_pos = torch.where(s < start + length, s, EMPTY)
    return causal_mask(query_pos, key_pos)


class PagedKVCache(KVCache):
    """K/V pools shared by all sequences; which slots belong to whom is the block manager's business.

    use_triton: decode attention through the Triton kernel (GPU) instead of gather + SDPA (the reference path).
    cpu_kernel: on a CPU, decode attention through the C++ kernel of cpu_attention.py (default: where it builds).
    kv_dtype: the pools' dtype, if not the model's: torch.float8_e4m3fn stores keys and values in 8 bits (vLLM's
    kv_cache_dtype="fp8", with its default scale of 1): half the bytes every decode step reads, twice the tokens in
    the same memory. New keys/values are rounded to it once, when written (saturating at +-448, e4m3's largest
    value), and every path attends over the rounded values, converted back to the model's dtype as they are read.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, use_triton: bool = False, cpu_kernel: bool | None = None,
                 kv_dtype: torch.dtype | None = None):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        kv_dtype = kv_dtype or dtype
        self.keys = [torch.zeros(shape, dtype=kv_dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=kv_dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.use_triton = use_triton
        self.decode_kernel = None  # None: the reference path (gather + SDPA)
        # The C++ kernel reads pools of the model's dtype only.
        if not use_triton and torch.device(device).type == "cpu" and cpu_kernel is not False and kv_dtype == dtype:
            from engines.ours import cpu_attention
            self.decode_kernel = cpu_attention.load()
        if use_triton:  # imported only here: CPU-only installs need not have Triton
            from engines.ours.triton_attention import paged_decode_attention
            from engines.ours.triton_unified_attention import unified_paged_attention
            self.decode_kernel, self.unified_kernel = paged_decode_attention, unified_paged_attention
        self.metadata: AttentionMetadata | None = None  # set by the model runner before each forward

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # Left out of torch.compile (compile_layers): its loops over this step's groups change from step to step and
    # would recompile; the Triton kernel and index copies inside are single kernels already.
    @torch.compiler.disable
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """q: [1, H, N, D]; k, v: [1, Hkv, N, D] for the step's N flat tokens -> attention output [1, H, N, D]."""
        meta = self.metadata
        k_pool, v_pool = self.keys[layer], self.values[layer]
        hkv, d = k_pool.shape[2], k_pool.shape[3]
        k_new, v_new = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, Hkv, D]
        if k_pool.dtype != k_new.dtype:  # an FP8 pool: the rounded values are stored, and attended over below too
            k_new, v_new = _write_fp8(k_pool, meta.slot_mapping, k_new), _write_fp8(v_pool, meta.slot_mapping, v_new)
        else:  # write first, so each token attends to itself and to earlier tokens of its own chunk through the pool
            k_pool.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k_new)
            v_pool.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v_new)
        q_flat = q[0].transpose(0, 1)  # [N, H, D]
        if meta.unified is not None:
            return self.unified_kernel(q_flat, k_pool, v_pool, meta.unified.block_tables,
                                       meta.unified.tiles).transpose(0, 1)[None]
        out = torch.empty_like(q_flat)
        gqa = q.shape[1] != hkv
        for g in meta.decode:
            qg = q_flat[g.token_index]  # [B, H, D]
            if self.decode_kernel is not None:  # Triton on a GPU, C++ on a CPU: reads the pool in place
                out[g.token_index] = self.decode_kernel(qg, k_pool, v_pool, g.block_tables, g.seq_lens)
            else:
                b = qg.shape[0]
                tables = g.block_tables.long()
                keys = k_pool[tables].view(b, -1, hkv, d).transpose(1, 2).to(q.dtype)  # [B, Hkv, S, D]
                values = v_pool[tables].view(b, -1, hkv, d).transpose(1, 2).to(q.dtype)
                # Built from seq_lens on the device, so this path too has fixed shapes for a captured graph.
                mask = torch.arange(keys.shape[2], device=q.device) < g.seq_lens[:, None]
                out[g.token_index] = attention(qg[:, :, None], keys, values, mask[:, None, None])[:, :, 0]
        for g in meta.fresh:
            # [B, T, H, D] -> [B, H, T, D]; the chunk's own keys are all it may see.
            qg = q_flat[g.token_index].transpose(1, 2)
            kg = k_new[g.token_index].transpose(1, 2).to(q.dtype)
            vg = v_new[g.token_index].transpose(1, 2).to(q.dtype)
            og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=gqa)
            out[g.token_index] = og.transpose(1, 2)
        for g in meta.cached:
            keys = k_pool[g.block_table].view(1, -1, hkv, d).transpose(1, 2).to(q.dtype)  # [1, Hkv, S, D]
            values = v_pool[g.block_table].view(1, -1, hkv, d).transpose(1, 2).to(q.dtype)
            qg = q_flat[g.token_index].transpose(0, 1)[None]  # [1, H, Tq, D]
            out[g.token_index] = attention(qg, keys, values, g.mask)[0].transpose(0, 1)
        return out.transpose(0, 1)[None]


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _write_fp8(pool: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Round new [N, Hkv, D] to the pool's 8-bit dtype, store it at `slots`, return the rounded values.
    Clamped first: a cast to float8_e4m3fn is not guaranteed to saturate (e4m3fn has no infinity; overflow may give
    NaN). Copied as bytes: index_copy_ has no float8 kernel."""
    rounded = new.clamp(-FP8_MAX, FP8_MAX).to(pool.dtype)
    pool.view(torch.uint8).view(-1, *new.shape[1:]).index_copy_(0, slots, rounded.view(torch.uint8))
    return rounded
