"""Weight-only INT4 matrix-matrix product in Triton: y = x @ W^T for many rows, W unpacked in registers.

With continuous batching a decode step multiplies 16-256 rows by each weight, and that is still mostly reading W
(an H100 needs ~300 rows before a BF16 projection is compute-bound). Our other INT4 paths lose to BF16 there: the
"dequant" backend writes a float copy of W (4x the packed bytes) before cuBLAS reads it again, and tinygemm
(`_weight_int4pack_mm`) is built for a row or two. This kernel reads only the packed codes, 4x fewer bytes than
BF16, and multiplies on the tensor cores (tl.dot):

- a program owns BLOCK_N output channels x BLOCK_M rows and walks K a BLOCK_K tile at a time, in float32;
- BLOCK_K divides the group size, so within a K tile each channel has one scale and one zero;
- it computes y^T = W x^T: the unpacked weight tile is the dot's left operand, which Hopper's tensor cores (wgmma)
  read straight from registers, where the unpacking left it, and whose side must be 64 (BLOCK_N); the rows of x
  are the right operand, whose side can be 16, so a batch of 16 fills the instruction;
- byte b of a weight row holds codes 2b (low nibble) and 2b + 1 (high): tl.join + reshape put them back in k
  order, so x is read in contiguous rows (async copies; reading x[:, 0::2] and x[:, 1::2] separately instead made
  the kernel 2x slower on an H100);
- codes become weights in x's dtype: q - z is exact, times s rounds once: the weights the "dequant" backend builds;
- with few rows there are too few programs to keep every SM reading (64 for N = 4096), so K is split among up to
  8 programs whose float32 partial sums are added afterwards (split-K).

On an H100 (gemm_bench.py; Llama-2-7B shapes, group 128, bfloat16, CUDA-graph replay) it is faster than BF16 up to
32 rows (16 rows: 19 vs 23 us at 4096 x 4096, 35 vs 47 us at 4096 x 11008), even at 64 rows and slower beyond:
the unpacking is redone for every BLOCK_M rows, so at 256 rows it takes 2-2.6x BF16's time (still 3x less than the
"dequant" backend). Past a few dozen rows, weight-only INT4 saves memory, not time.

Past DEQUANT_MIN_ROWS rows (prefill chunks, large batches) the work is the multiply, not the reading, and cuBLAS
multiplies faster than this kernel (2-3x at 256-1024 rows, above): `int4_dequantize` writes W in x's dtype with a
one-pass kernel (the same unpacking, so the same weights), and F.linear multiplies. Writing W costs about what
reading it in BF16 does, small next to the multiply of hundreds of rows; linear.py takes that path there.

A second kernel, `_int4_gemm_factored_kernel`, takes the scale and zero out of the inner loop (K tiles within one
group): the tile fed to the tensor cores is the codes plus a constant, unpacked two at a time by one AND and one OR on
a 32-bit word, and each channel's scale and zero are applied once per tile. Compiled for an H100 (sm_90), its loop
issues about 4.8 instructions per weight at one row against 5.5-6.5 for the kernel above (counted in the SASS by
`python -m quantization.kernel_sass`); config FACTORED=True selects it and gemm_tiles.py sweeps both. Timed, it lost:
the Llama-2-7B shape decoded at 7.61 ms/token through it at one row on an H100 (2026-12-07, gpu_bench.py's
"factored" config), where tinygemm takes 3.2, so block_config leaves it off (FACTORED_MAX_ROWS = 0).

Block sizes come from a small table by row count, not from autotuning: a serving engine captures CUDA graphs, and
timing configs during a capture is trouble. At one row linear.py uses triton_gemv.py's kernel instead.
Checked against the float reference in tests/test_quantization_triton.py (Triton's CPU interpreter; float32) and
on a GPU by its bfloat16 twin; timed against BF16 by quantization/gemm_bench.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _weights(packed, z, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """uint8 [BLOCK_N, BLOCK_K/2] bytes, zeros and scales [BLOCK_N, 1] -> W tile [BLOCK_N, BLOCK_K] in dtype."""
    # join puts each byte's two nibbles side by side, so merging the last two dims gives k = 2b (low), 2b + 1 (high).
    codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
    # int -> float with no conversion instruction (those run at a quarter of the ALU rate, and this is the
    # kernel's hot loop): OR the code into the low mantissa bits of 2^e, e the mantissa width, and the bits read as
    # the float 2^e + code, exactly. Subtracting 2^e + z is exact too, so only "* s" rounds.
    if dtype == tl.float32:
        w, zero = (codes.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True), z.to(dtype) + 8388608.0
    elif dtype == tl.float16:
        w, zero = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True), z.to(dtype) + 1024.0
    else:
        w, zero = (codes.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True), z.to(dtype) + 128.0
    return (w - zero) * s.to(dtype)


@triton.jit(do_not_specialize=["M", "SPLIT"])  # one compiled kernel for every row count and split
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, SPLIT, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr,
                      PRECISION: tl.constexpr):
    # Axis 0 (the M tiles) is launched fastest, so the programs running together share a weight tile: it comes
    # from DRAM once and from L2 for the other row tiles.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    x_tile = x_ptr + m[None, :] * K + tl.arange(0, BLOCK_K)[:, None]  # x^T [BLOCK_K, BLOCK_M]: rows stay contiguous
    w_tile = w_ptr + n[:, None] * (K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]  # bytes [BLOCK_N, BLOCK_K/2]
    sz = n[:, None] * (K // GROUP)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T: see the module docstring
    for t in range(tl.program_id(2), K // BLOCK_K, SPLIT):  # split-K: program p takes K tiles p, p + SPLIT, ...
        k0 = t * BLOCK_K
        xt = tl.load(x_tile + k0, mask=m_ok[None, :], other=0.0)
        packed = tl.load(w_tile + k0 // 2, mask=n_ok[:, None], other=0)
        # The tile's groups (BLOCK_K divides K, and GROUP divides BLOCK_K or BLOCK_K divides GROUP: no K masks).
        g = k0 // GROUP + tl.arange(0, TILE_GROUPS)[None, :]
        s = tl.load(s_ptr + sz + g, mask=n_ok[:, None], other=0.0)  # [BLOCK_N, TILE_GROUPS]
        z = tl.load(z_ptr + sz + g, mask=n_ok[:, None], other=0)
        if TILE_GROUPS > 1:  # a wide tile spans several groups: each group's scale and zero over its columns
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, TILE_GROUPS, BLOCK_K // TILE_GROUPS)),
                           (BLOCK_N, BLOCK_K))
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, TILE_GROUPS, BLOCK_K // TILE_GROUPS)),
                           (BLOCK_N, BLOCK_K))
        w = _weights(packed, z, s, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    y = y_ptr + tl.program_id(2) * M * N + m[None, :] * N + n[:, None]  # SPLIT > 1: float32 partial sums [SPLIT, M, N]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


@triton.jit
def _code_pair(words, p: tl.constexpr, dtype: tl.constexpr):
    """Codes p and p + 4 of int32 words [BLOCK_N, W] -> [BLOCK_N, W, 2] floats offset + code, offset = OFFSET[dtype].

    In 16 bits both codes are unpacked by one AND and one OR on the 32-bit word: each half becomes a float whose
    exponent is the offset's and whose low mantissa bits are the code (0x4300 | q is the bfloat16 128 + q). That is
    one instruction per weight where a conversion per weight would run at a quarter of the ALU rate."""
    if dtype == tl.float32:
        lo = (((words >> (4 * p)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        hi = (((words >> (4 * p + 16)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        bits: tl.constexpr = 0x4300 if dtype == tl.bfloat16 else 0x6400
        both = ((words >> (4 * p)) & 0x000F000F) | (bits << 16 | bits)
        lo = (both & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True)
        hi = (both >> 16).to(tl.uint16).to(dtype, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _offset_codes(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_K/8] (code i of word j is input 8j + i) -> [BLOCK_N, BLOCK_K] of offset + code.

    Column c = 8j + 2p + h holds input 8j + p + 4h (tile_inputs below): the order in which _code_pair leaves them."""
    a = tl.join(tl.join(_code_pair(words, 0, dtype), _code_pair(words, 1, dtype)),
                tl.join(_code_pair(words, 2, dtype), _code_pair(words, 3, dtype)))  # [BLOCK_N, W, h, p % 2, p // 2]
    return tl.reshape(tl.permute(a, (0, 1, 4, 3, 2)), (BLOCK_N, BLOCK_K))


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _int4_gemm_factored_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, SPLIT, GROUP: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               OFFSET: tl.constexpr, PRECISION: tl.constexpr):
    """_int4_gemm_kernel with the scale and zero taken out of the inner loop: per K tile (within one group)
    sum_k (q - z) s x = s (sum_k (OFFSET + q) x - (OFFSET + z) sum_k x), so the tile fed to the tensor cores is the
    codes plus a constant, which is exact and costs one instruction per two weights, and the scale and zero are
    applied once per channel and row instead of once per weight."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    c = tl.arange(0, BLOCK_K)
    tile_inputs = (c // 8) * 8 + (c % 8) // 2 + 4 * (c % 2)  # see _offset_codes
    x_tile = x_ptr + m[None, :] * K + tile_inputs[:, None]  # x^T [BLOCK_K, BLOCK_M] in the tile's column order
    w_tile = w_ptr + n[:, None] * (K // 8) + tl.arange(0, BLOCK_K // 8)[None, :]  # int32 words [BLOCK_N, BLOCK_K/8]
    sz = n * (K // GROUP)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(tl.program_id(2), K // BLOCK_K, SPLIT):
        k0 = t * BLOCK_K
        xt = tl.load(x_tile + k0, mask=m_ok[None, :], other=0.0)
        words = tl.load(w_tile + k0 // 8, mask=n_ok[:, None], other=0).to(tl.uint32, bitcast=True)
        s = tl.load(s_ptr + sz + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz + k0 // GROUP, mask=n_ok, other=0).to(tl.float32)
        d = tl.dot(_offset_codes(words, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty), xt, input_precision=PRECISION)
        x_sum = tl.sum(xt.to(tl.float32), 0)
        acc += s[:, None] * (d - (OFFSET + z)[:, None] * x_sum[None, :])
    y = y_ptr + tl.program_id(2) * M * N + m[None, :] * N + n[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


@triton.jit(do_not_specialize=["MN", "SPLIT"])
def _sum_splits_kernel(part_ptr, y_ptr, MN, SPLIT, BLOCK: tl.constexpr):
    """y = sum over the SPLIT float32 partial products [SPLIT, M, N], added in order, written in y's dtype: one pass
    where torch's sum, then a cast, took two."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLIT):
        acc += tl.load(part_ptr + split * MN + i, mask=ok, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int4_dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K  # BLOCK_K divides GROUP: one scale and zero per channel in this tile
    n_ok = n[:, None] < N
    packed = tl.load(w_ptr + n[:, None] * (K // 2) + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=n_ok,
                     other=0)
    s = tl.load(s_ptr + n[:, None] * (K // GROUP) + k0 // GROUP, mask=n_ok, other=0.0)
    z = tl.load(z_ptr + n[:, None] * (K // GROUP) + k0 // GROUP, mask=n_ok, other=0)
    w = _weights(packed, z, s, BLOCK_N, BLOCK_K, out_ptr.dtype.element_ty)
    tl.store(out_ptr + n[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :], w, mask=n_ok)


def k_tile(group_size: int, max_k: int = 128, K: int | None = None) -> int:
    """The largest K tile up to max_k (a power of two, 32 or more: a dot needs a depth of 16, and BLOCK_K / 2
    bytes >= 16) that divides K and either divides the group, so that a tile has one scale and zero per channel, or
    is a multiple of it, so that it holds whole groups."""
    block_k = next((bk for bk in (1024, 512, 256, 128, 64, 32) if bk <= max_k and (K is None or K % bk == 0)
                    and (group_size % bk == 0 or (K is not None and bk % group_size == 0))), None)
    if block_k is None:
        raise ValueError(f"the Triton INT4 kernels take group sizes that are multiples of 32 (got {group_size})")
    return block_k


OFFSETS = {torch.bfloat16: 128.0, torch.float16: 1024.0, torch.float32: 0.0}  # see _code_pair
DEQUANT_MIN_ROWS = 128  # beyond this many rows linear.py dequantizes W and lets cuBLAS multiply


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """qweight uint8 [N, K/2], scales [N, G], zeros uint8 [N, G] -> W [N, K] in dtype, as int4_matmul unpacks it."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if K % group_size:
        raise ValueError(f"group size {group_size} does not divide K = {K}")
    block_k = k_tile(group_size)
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(N, 32), K // block_k)
    _int4_dequantize_kernel[grid](qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, N, K,
                                  group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)
    return out


# (up to rows, BLOCK_M, BLOCK_N, BLOCK_K at most, num_warps, num_stages), from gemm_tiles.py's sweep on an H100
# over Llama-2-7B's four fused projections (results/h100/gemm_tiles.json; rows 17-32 were not swept). BLOCK_N is
# the tensor-core instruction's M side, 64 rows per 4 warps; BLOCK_M, its N side, can be as small as 16, so a few
# rows waste little of the instruction. Few rows: reading W is the cost, so wide K tiles (more bytes in flight per
# program), and split-K below, as a program per 64 channels leaves SMs idle (64 programs for N = 4096 on 132 SMs).
# Many rows: tall x tiles and wide channel tiles, so each unpacked weight tile serves more rows (the unpacking, not
# the dot, is what grows with M / BLOCK_M).
TILES = ((16, 16, 64, 256, 4, 4), (32, 32, 64, 256, 4, 4), (64, 64, 128, 256, 8, 4), (None, 128, 128, 256, 8, 2))
# Up to this many rows the table picks the factored kernel (scale and zero out of the inner loop): none, since it
# was timed slower (above); gpu_bench.py's "factored" configs set it to 16.
FACTORED_MAX_ROWS = 0


@functools.lru_cache
def _sm_count(device: torch.device) -> int:  # on a CPU (the interpreter tests) 8, so that small shapes split K too
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


@functools.lru_cache
def _shared_memory(device: torch.device) -> int:  # bytes a program may use: 227 KiB on an H100, 99 KiB on an RTX 4090
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def block_config(M: int, N: int, K: int, group_size: int, device: torch.device) -> dict:
    _, block_m, block_n, max_k, warps, stages = next(t for t in TILES if t[0] is None or M <= t[0])
    factored = M <= FACTORED_MAX_ROWS
    block_k = k_tile(group_size, min(max_k, group_size) if factored else max_k, K)
    # The H100's table on a GPU with less shared memory: fewer pipeline stages, then narrower K tiles, until each
    # stage's x tile (2-byte values) and packed weight tile fit.
    while stages * block_k * (block_m * 2 + block_n // 2) > _shared_memory(device) and (stages > 2 or block_k > 32):
        if stages > 2:
            stages -= 1
        else:
            block_k = k_tile(group_size, block_k // 2, K)
    # Split K while the tiles alone give under 4 programs per SM, up to 8 ways at 16 rows or fewer and 4 beyond (the
    # float32 partial sums [split, M, N] grow with M). gemm_tiles.py on an H100, 128 rows, the table's tile: 4 ways
    # against 2 took o from 42.4 to 30.4 us, down from 92.3 to 58.0, q|k|v from 78.8 to 72.5 (gate|up keeps 2).
    tiles, split = triton.cdiv(M, block_m) * triton.cdiv(N, block_n), 1
    while (split * 2 <= (8 if M <= 16 else 4) and tiles * split * 2 <= 4 * _sm_count(device)
           and split * 2 <= K // block_k):
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, num_warps=warps, num_stages=stages,
                FACTORED=factored)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, split: int | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K], qweight uint8 [N, K/2] (even k in the low nibble), scales [N, G], zeros uint8 [N, G] -> y [M, N].

    y = x @ W^T with W[n, k] = (q[n, k] - z[n, k // group_size]) * s[n, k // group_size], in x's dtype.
    `split` overrides the split-K factor (the tests use it to cover both paths), `config` any of block_config's
    entries (gemm_tiles.py sweeps them).
    """
    M, K = x.shape
    N = qweight.shape[0]
    if qweight.shape[1] * 2 != K or K % group_size or scales.shape != (N, K // group_size):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}, group size {group_size}")
    if M == 0:
        return x.new_empty(0, N)
    config = {**block_config(M, N, K, group_size, x.device), **(config or {})}
    if split is not None:
        config["SPLIT"] = split
    block_k = config["BLOCK_K"]
    if K % block_k or (group_size % block_k and block_k % group_size):
        raise ValueError(f"BLOCK_K {block_k} must divide K = {K} and divide or be a multiple of the group size")
    grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]), config["SPLIT"])
    out = torch.empty(config["SPLIT"], M, N, dtype=x.dtype if config["SPLIT"] == 1 else torch.float32,
                      device=x.device)
    # float32 (the tests) multiplies in full precision: TF32 keeps 10 mantissa bits and would fail an exact check.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    split = config.pop("SPLIT")
    if config.pop("FACTORED", False):
        if group_size % block_k or x.dtype not in OFFSETS:
            raise ValueError(f"the factored kernel takes K tiles within a group (BLOCK_K {block_k}, group "
                             f"{group_size}) and {', '.join(map(str, OFFSETS))} inputs (got {x.dtype})")
        _int4_gemm_factored_kernel[grid](x.contiguous(), qweight.contiguous().view(torch.int32), scales.contiguous(),
                                         zeros.contiguous(), out, M, N, K, split, group_size,
                                         OFFSET=OFFSETS[x.dtype], PRECISION=precision, **config)
    else:
        _int4_gemm_kernel[grid](x.contiguous(), qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out,
                                M, N, K, split, group_size, TILE_GROUPS=max(1, block_k // group_size),
                                PRECISION=precision, **config)
    if grid[2] == 1:
        return out[0]
    # Partial sums added in a fixed order: the same input gives the same output, bit for bit, every call.
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](out, y, M * N, grid[2], BLOCK=1024, num_warps=4)
    return y
