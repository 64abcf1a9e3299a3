"""Paged decode attention on a CPU: a small C++ kernel that reads each sequence's keys and values straight from the
pool through its block table, the CPU counterpart of triton_attention.py.

The reference path (paged_cache.PagedKVCache.attend without Triton) gathers every decoding sequence's blocks into a
padded [B, Hkv, S, D] copy, then runs SDPA over it: each K/V byte is read, written and read again, and the padding up
to the group's longest sequence is computed and masked. Here one task per sequence walks its blocks in place, every
head at once: the scores of each query head against its KV head's keys, a softmax over the sequence's own keys,
then the weighted sum of its values. Each K/V byte is read once, no padding is touched, and the next block is
prefetched while one is computed (blocks lie anywhere in the pool, where the hardware prefetchers cannot guess
them). Tasks run on PyTorch's intra-op threads (at::parallel_for).

The kernel is compiled at first use with the machine's C++ compiler (torch.utils.cpp_extension; cached under
~/.cache/torch_extensions, so later starts only load it). Where that fails (no compiler, no ninja), `load()` returns
None and the cache keeps the reference path.
"""
from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

NAME = "llmip_cpu_paged_attention"

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// q [B, H, D]; k_pool, v_pool [num_blocks, block_size, Hkv, D]; block_tables int32 [B, W]; seq_lens int32 [B].
// Writes out [B, H, D]: for each sequence b and head h, softmax(q . k / sqrt(D)) . v over keys 0 .. seq_lens[b]-1.
// One task per sequence: it walks the sequence's blocks in order, each block one contiguous
// [block_size, Hkv, D] slab of the pool, every head at once.
template <typename T>
void decode_kernel(const T* q, const T* k_pool, const T* v_pool, const int* tables, const int* seq_lens, T* out,
                   int64_t num_seqs, int64_t H, int64_t Hkv, int64_t D, int64_t block_size, int64_t W) {
  const int64_t G = H / Hkv;  // query heads per KV head: each key row is loaded once for all of them
  const int64_t row = Hkv * D, block_stride = block_size * row;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // The next block is somewhere else in the pool: ask for it while this one is computed, since the hardware
  // prefetchers only follow the contiguous run inside a block.
  auto prefetch = [&](const T* p) {
    for (int64_t i = 0; i < block_stride; i += 64 / sizeof(T)) __builtin_prefetch(p + i);
  };
  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = std::min<int64_t>(std::max(seq_lens[b], 0), W * block_size);  // never past the table
      const int* table = tables + b * W;
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(q[b * H * D + i]) * scale;
      scores.resize(H * len);
      // Pass 1: scores [H, len].
      for (int64_t j = 0; j < num_blocks; ++j) {
        const T* block = k_pool + table[j] * block_stride;
        if (j + 1 < num_blocks) prefetch(k_pool + table[j + 1] * block_stride);
        else prefetch(v_pool + table[0] * block_stride);
        for (int64_t s = j * block_size; s < std::min(len, (j + 1) * block_size); ++s) {
          const T* k = block + (s - j * block_size) * row;
          for (int64_t h = 0; h < H; ++h) {
            const float* qh = qf.data() + h * D;
            const T* kh = k + (h / G) * D;
            float dot = 0.f;
            #pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < D; ++d) dot += qh[d] * static_cast<float>(kh[d]);
            scores[h * len + s] = dot;
          }
        }
      }
      // Softmax over the sequence's own keys, in place (none when len is 0).
      for (int64_t h = 0; h < H && len > 0; ++h) {
        float* sh = scores.data() + h * len;
        float mx = sh[0], sum = 0.f;
        for (int64_t s = 0; s < len; ++s) mx = std::max(mx, sh[s]);
        for (int64_t s = 0; s < len; ++s) { sh[s] = std::exp(sh[s] - mx); sum += sh[s]; }
        for (int64_t s = 0; s < len; ++s) sh[s] /= sum;
      }
      // Pass 2: the probability-weighted sum of value rows.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < num_blocks; ++j) {
        const T* block = v_pool + table[j] * block_stride;
        if (j + 1 < num_blocks) prefetch(v_pool + table[j + 1] * block_stride);
        for (int64_t s = j * block_size; s < std::min(len, (j + 1) * block_size); ++s) {
          const T* v = block + (s - j * block_size) * row;
          for (int64_t h = 0; h < H; ++h) {
            const float p = scores[h * len + s];
            const T* vh = v + (h / G) * D;
            float* ah = acc.data() + h * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; ++d) ah[d] += p * static_cast<float>(vh[d]);
          }
        }
      }
      // No keys (len 0): acc stays zero, a zero output rather than a softmax over nothing.
      for (int64_t i = 0; i < H * D; ++i) out[b * H * D + i] = static_cast<T>(acc[i]);
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor seq_lens) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && q.size(2) == k_pool.size(3) && q.size(1) % k_pool.size(2) == 0);
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes() && q.scalar_type() == k_pool.scalar_type());
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt && seq_lens.scalar_type() == torch::kInt);
  TORCH_CHECK(block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0));
  q = q.contiguous(); block_tables = block_tables.contiguous(); seq_lens = seq_lens.contiguous();
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous());
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
                            block_tables.data_ptr<int>(), seq_lens.data_ptr<int>(), out.data_ptr<scalar_t>(),
                            q.size(0), q.size(1), k_pool.size(2), q.size(2), k_pool.size(1), block_tables.size(1));
  });
  return out;
}
"""


@functools.cache
def load():
    """The compiled kernel's `paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens)`, or None where it
    cannot be built here."""
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline
        if not any(Path(_get_build_directory(NAME, False)).glob("*.so")):  # a silent half minute otherwise
            print("compiling the CPU paged-attention kernel (once; about 30 s on 2 cores)", file=sys.stderr, flush=True)
        # -march=native: this machine's vector width (AVX-512 where there is one); -ffast-math: the softmax's exp
        # vectorised too (the kernel never meets an infinity or NaN of its own making).
        module = load_inline(NAME, SOURCE, functions=["paged_decode_attention"], extra_ldflags=["-fopenmp"],
                             extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"])
    except Exception as e:  # no compiler, no ninja, an unsupported platform: the reference path still works
        warnings.warn(f"CPU paged attention kernel unavailable ({type(e).__name__}: {e}); using gather + SDPA")
        return None
    return module.paged_decode_attention
