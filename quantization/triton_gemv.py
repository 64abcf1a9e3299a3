"""Weight-only INT8 and INT4 matrix-vector kernels in Triton: read the packed weights once, never a float copy.

At batch 1 a decode step is y = x @ W^T for a single row x, so its time is the time to read W. PyTorch's built-in
INT8 kernel (`_weight_int8pack_mm`) is far slower than BF16 at one row on an H100, and the "dequant" backend writes
a float copy of W before multiplying, so neither gets the 2x (INT8) or 4x (INT4) fewer bytes that quantization
promises. These kernels load packed codes as 32-bit words, widen them in registers, and multiply-accumulate in
float32:

- each program owns BLOCK_N output channels of one input row and walks its share of K (all of it, or 1/SPLIT: split-K,
  see _store) a tile of BLOCK_W words at a time, loading the next tile before it computes on this one (twice the
  bytes in flight: reading W is the whole cost);
- a word holds 8 INT4 codes (our packing, read little-endian: code i of word j is input 8j + i) or 4 INT8 codes;
- codes become floats without an int-to-float conversion, which runs at an eighth of the FMA rate on an H100 and
  would cost as much as reading the weights: AND-OR-ing a code c that sits at bit p into the bits of 1.0 gives the
  float 1 + c 2^(p-23) exactly, in one instruction. Multiplied by x 2^(23-p) (exact: a power of two) that is
  x 2^(23-p) + c x, and the first term, the same for every channel, is summed once per tile and taken off at the
  end. A code must sit high in the mantissa for that difference to keep its precision (p = 12 or 16 for INT4,
  15 for INT8: about 1e-5 relative, far below bfloat16's rounding); INT4 gets there with three shifts per word (by
  8 each way, and a rotation by 16 for codes 0 and 7), INT8 with four. Instructions per weight in the loop:
  `python -m quantization.kernel_sass`;
- INT4: y[n] = sum_g s[n, g] (sum_{k in g} q[n, k] x[k] - z[n, g] sum_{k in g} x[k]): a tile holds whole groups,
  so each group's scale and zero are read and applied once, to its sums (groups of 8 to 512 inputs, powers of
  two); INT8: y[n] = s[n] sum_k q x (q + 128 unsigned: an XOR per word, with 128 sum x taken off).

They are for a few rows (decode): the modules in linear.py send more rows elsewhere. Checked against the float
reference in tests/test_quantization_triton.py (Triton's CPU interpreter) and on a GPU by quantization/gpu_bench.py's
kernel-error column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

@triton.jit
def _one_plus(word, p: tl.constexpr, one):
    """The code at bits p..p+3 of word (p + 3 <= 22) as the float 1 + code 2^(p-23): OR-ed into one, 1.0's bits."""
    return ((word & (0xF << p)) | one).to(tl.float32, bitcast=True)


@triton.jit
def _tile(w_ptr, n, n_ok, W, j, end):
    """Words j of rows n (W words each; zeros past the last row and from word `end` on): [BLOCK_N, BLOCK_W]."""
    return tl.load(w_ptr + n[:, None] * W + j[None, :], mask=n_ok[:, None] & (j < end)[None, :], other=0)


@triton.jit
def _channels(N, BLOCK_N: tl.constexpr):
    """This program's row of x, its BLOCK_N output channels, and which of them exist."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(1), n, n < N


@triton.jit
def _scales_and_zeros(s_ptr, z_ptr, n, n_ok, g, groups):
    """INT4 scales and zero points of channels n in groups g, [BLOCK_N, BLOCK_G] float32 (read once per group)."""
    ok = n_ok[:, None] & (g < groups)[None, :]
    s = tl.load(s_ptr + n[:, None] * groups + g[None, :], mask=ok, other=0.0).to(tl.float32)
    return s, tl.load(z_ptr + n[:, None] * groups + g[None, :], mask=ok, other=0).to(tl.float32)


@triton.jit
def _words_of(W, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr):
    """The words [start, end) of each row that this program reads: its share of whole tiles."""
    per_split = tl.cdiv(tl.cdiv(W, BLOCK_W), SPLIT) * BLOCK_W
    start = tl.program_id(2) * per_split
    return start, tl.minimum(W, start + per_split)


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL, sm_90+), this kernel's programs may start while the previous kernel
    on the stream still runs: what came before this call (the first weight tile's loads: weights never change) overlaps
    its tail. Wait here until it has finished, since x, the counters and the scratch are its kernels' to write; then
    let the next kernel start its own programs (they wait for ours the same way)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _store(y_ptr, part_ptr, count_ptr, partial, n, n_ok, N, SPLIT: tl.constexpr):
    """y[row, n] = partial summed over the SPLIT programs that share these channels, in split order (deterministic).

    Split-K: with SPLIT > 1, each program writes its partial sums to part[split, row, n] and takes a ticket from the
    channel block's counter; the program that takes the last ticket adds the SPLIT partials, writes y and sets the
    counter back to zero for the next launch (so one zeroed counter buffer serves every launch, CUDA graphs included).
    """
    row = tl.program_id(1)
    if SPLIT == 1:
        tl.store(y_ptr + row * N + n, partial.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        M = tl.num_programs(1)
        tl.store(part_ptr + (tl.program_id(2) * M + row) * N + n, partial, mask=n_ok)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (release)
        counter = count_ptr + row * tl.num_programs(0) + tl.program_id(0)
        ticket = tl.atomic_add(counter, 1, sem="acq_rel")
        mine = n_ok & (n * 0 + ticket == SPLIT - 1)  # the last program's channels (n * 0: a vector for the masks)
        total = tl.zeros_like(partial)
        for split in tl.static_range(SPLIT):  # from L2 (.cg): the other programs' partials were never in our L1
            total += tl.load(part_ptr + (split * M + row) * N + n, mask=mine, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + row * N + n, total.to(y_ptr.dtype.element_ty), mask=mine)
        tl.store(counter, 0, mask=ticket == SPLIT - 1)


@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr, N, K, W, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    WORDS_PER_GROUP: tl.constexpr = GROUP // 8
    BLOCK_G: tl.constexpr = BLOCK_W // WORDS_PER_GROUP  # whole groups per tile: a tile starts on a group boundary
    row, n, n_ok = _channels(N, BLOCK_N)
    groups = K // GROUP
    start, end = _words_of(W, BLOCK_W, SPLIT)
    # 1.0's bits, made from N (>= 0, so N >> 31 is 0) for the compiler cannot tell it is a constant: it then keeps it
    # in one register, where a literal would be materialized again before every one of the AND-ORs that use it.
    one = 0x3F800000 | (N >> 31)
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    words = _tile(w_ptr, n, n_ok, W, start + tl.arange(0, BLOCK_W), end)
    _after_previous_kernel(PDL)
    for w0 in range(start, end, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)
        j_ok = j < end
        following = _tile(w_ptr, n, n_ok, W, j + BLOCK_W, end)  # in flight while this tile is computed on
        dot = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)  # sum of (1 + q 2^(p-23)) x 2^(23-p), per word
        x_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
        xs_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)  # sum of x 2^(23-p): the 1's share of dot
        # Version v of the word holds codes 2v - 1 and 2v (mod 8) at bits 12 and 16: v0 is the word rotated by 16
        # (codes 7 and 0), v1 shifted left by 8 (1, 2), v2 as it is (3, 4), v3 shifted right by 8 (5, 6).
        versions = (((words >> 16) & 0xFFFF) | (words << 16), words << 8, words, words >> 8)
        for i in tl.static_range(8):
            x = tl.load(x_ptr + row * K + 8 * j + i, mask=j_ok, other=0.0).to(tl.float32)
            xs = x * (2048.0 if i % 2 else 128.0)  # 2^(23-p) for p = 12, 16
            x_sum += x
            xs_sum += xs
            dot += _one_plus(versions[(i + 1) % 8 // 2], 16 - 4 * (i % 2), one) * xs[None, :]
        # Per group: sum q x and sum x, then its scale and zero once (not once per word).
        dot = tl.sum(tl.reshape(dot, (BLOCK_N, BLOCK_G, WORDS_PER_GROUP)), axis=2)
        x_sum = tl.sum(tl.reshape(x_sum, (BLOCK_G, WORDS_PER_GROUP)), axis=1)
        xs_sum = tl.sum(tl.reshape(xs_sum, (BLOCK_G, WORDS_PER_GROUP)), axis=1)
        g = w0 // WORDS_PER_GROUP + tl.arange(0, BLOCK_G)
        s, z = _scales_and_zeros(s_ptr, z_ptr, n, n_ok, g, groups)
        acc += s * (dot - xs_sum[None, :] - z * x_sum[None, :])
        words = following
    _store(y_ptr, part_ptr, count_ptr, tl.sum(acc, axis=1), n, n_ok, N, SPLIT)


@triton.jit
def _int8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, N, K, W, BLOCK_N: tl.constexpr,
                 BLOCK_W: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    row, n, n_ok = _channels(N, BLOCK_N)
    start, end = _words_of(W, BLOCK_W, SPLIT)
    one = 0x3F800000 | (N >> 31)  # as in _int4_kernel
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)  # sum of (1 + (q + 128) / 256) 256 x, per word
    x_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
    xs_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
    words = _tile(w_ptr, n, n_ok, W, start + tl.arange(0, BLOCK_W), end)
    _after_previous_kernel(PDL)
    for w0 in range(start, end, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)
        j_ok = j < end
        following = _tile(w_ptr, n, n_ok, W, j + BLOCK_W, end)  # in flight while this tile is computed on
        biased = words ^ -0x7F7F7F80  # XOR 0x80 in every byte: q + 128, from 0 to 255
        versions = (biased << 15, biased << 7, biased >> 1, biased >> 9)  # byte i at bit 15 of version i
        for i in tl.static_range(4):
            x = tl.load(x_ptr + row * K + 4 * j + i, mask=j_ok, other=0.0).to(tl.float32)
            xs = x * 256.0  # 2^(23-15)
            x_sum += x
            xs_sum += xs
            acc += ((versions[i] & 0x7F8000) | one).to(tl.float32, bitcast=True) * xs[None, :]
        words = following
    s = tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    y = (tl.sum(acc, axis=1) - tl.sum(xs_sum, axis=0) - 128.0 * tl.sum(x_sum, axis=0)) * s
    _store(y_ptr, part_ptr, count_ptr, y, n, n_ok, N, SPLIT)


# On a GPU the channels per program, the words per K tile, the warps and the K split are tuned once per weight shape
# (during the warm-up, before any CUDA-graph capture). Splitting K matters for the smaller matrices: a 4096 x 4096
# INT4 matrix is 8 MB, 256 programs of 16 channels, each reading its 2 kB rows a tile at a time; with a split of 4
# there are four times as many programs, each with a quarter of the trips, and more of the matrix is in flight at
# once. Triton's CPU interpreter, which the tests use, cannot time kernels and takes the configs the tests give it.
TILES = ((8, 128, 4), (8, 256, 4), (16, 64, 4), (16, 128, 4), (16, 256, 8), (32, 128, 8))
SPLITS = (1, 2, 4, 8)
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w, "SPLIT": split}, num_warps=warps)
           for n, w, warps in TILES for split in SPLITS]
_int8_tuned = triton.autotune(configs=CONFIGS, key=["N", "K"])(_int8_kernel)
_int4_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "GROUP"])(_int4_kernel)
# Every config's tile holds whole groups up to this size (no pruning of configs: torch.compile failed on it).
MAX_GROUP = 8 * min(c.kwargs["BLOCK_W"] for c in CONFIGS)


def int4_matvec_takes(group_size: int) -> bool:
    return 8 <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0


def check_group_size(group_size: int) -> None:
    if not int4_matvec_takes(group_size):
        raise ValueError(f"the Triton INT4 matrix-vector kernels take group sizes that are powers of two from 8 to "
                         f"{MAX_GROUP} (got {group_size})")


def tuned_configs() -> dict[str, str]:
    """The config the tuner picked for each kernel and key (N, K[, GROUP], dtypes) so far in this process: for the
    benchmarks' records. A shape missing here was never tuned by Triton's autotuner (the interpreter, or a compiler
    that launched the kernel its own way)."""
    return {f"{name} {key}": str(config) for name, tuner in (("int4", _int4_tuned), ("int8", _int8_tuned))
            for key, config in tuner.cache.items()}


def split_counters(rows: int, channels: int, device) -> torch.Tensor:
    """The zeroed ticket counters split-K needs for up to `rows` x `channels` outputs. Every launch leaves them zero,
    so one buffer serves all the layers of a model (their kernels run one after another on a stream)."""
    return torch.zeros(rows * channels, dtype=torch.int32, device=device)


def _launch(tuned, plain, y: torch.Tensor, counters: torch.Tensor | None, config: dict | None, inputs: tuple,
            sizes: tuple, interpreted: dict, pdl: bool = False, **constants) -> None:
    """kernel(*inputs, y, parts, counters, *sizes, **constants) with `config`, or else tuned on a GPU and `interpreted`
    on a CPU; with `pdl`, as a programmatic dependent launch."""
    M, N = y.shape
    if counters is None:
        counters = split_counters(M, N, y.device)
    elif counters.numel() < M * N:  # one per channel block and row: enough for any BLOCK_N
        raise ValueError(f"{counters.numel()} split counters are too few for {M} x {N} outputs")
    parts = torch.empty(max(SPLITS) * M * N, dtype=torch.float32, device=y.device)  # never read before written
    launch = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}  # given even when False: torch.compile's
    launch.update(constants)  # launcher for a traced kernel (torch 2.11) does not fill in a constexpr's default
    if config is None and y.is_cuda:
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M, meta["SPLIT"])](*inputs, y, parts, counters, *sizes,
                                                                                 **launch)
    else:
        config = config or interpreted
        plain[(triton.cdiv(N, config["BLOCK_N"]), M, config["SPLIT"])](*inputs, y, parts, counters, *sizes, **config,
                                                                       **launch)


def _words(q: torch.Tensor, codes_per_word: int) -> torch.Tensor:
    if q.shape[-1] % 4 or not q.is_contiguous():
        raise ValueError(f"the Triton matrix-vector kernels read 32-bit words: K must be a multiple of "
                         f"{codes_per_word} (got {q.shape[-1] * codes_per_word // 4})")
    return q.view(torch.int32)


# Programmatic dependent launch (Hopper and later): each matrix-vector product may start while the kernel before it
# finishes, so its first weight tile is on its way by then (_after_previous_kernel). Off by default; use_pdl() turns
# it on for a process (gpu_bench's "pdl" configs, with torch.compile's own kernels made PDL-aware as well). AS_OP
# alone launches the kernels through the same custom ops without PDL (gpu_bench's "op": to tell the two apart).
PDL = False
AS_OP = False


def use_pdl(on: bool = True, as_op: bool | None = None) -> None:
    global PDL, AS_OP
    PDL, AS_OP = on, on if as_op is None else as_op


def int8_matvec(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, counters: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x [M, K] (a few rows), qweight int8 [N, K], scales [N] -> y [M, N] in x's dtype. counters: split_counters'
    (made, and zeroed, per call if not given); config: a fixed {BLOCK_N, BLOCK_W, SPLIT} instead of the tuned one."""
    if AS_OP and x.is_cuda and config is None:
        return torch.ops.llmip.int8_matvec_op(x, qweight, scales, counters, PDL)
    return _int8_matvec(x, qweight, scales, counters, config)


def int4_matvec(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, counters: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (a few rows), qweight uint8 [N, K/2] (low nibble first), scales [N, G], zeros uint8 [N, G];
    counters and config as for int8_matvec."""
    check_group_size(group_size)
    if AS_OP and x.is_cuda and config is None:
        return torch.ops.llmip.int4_matvec_op(x, qweight, scales, zeros, group_size, counters, PDL)
    return _int4_matvec(x, qweight, scales, zeros, group_size, counters, config)


def _int8_matvec(x, qweight, scales, counters, config, pdl=False):
    M, K = x.shape
    y = torch.empty(M, qweight.shape[0], dtype=x.dtype, device=x.device)
    _launch(_int8_tuned, _int8_kernel, y, counters, config, (x.contiguous(), _words(qweight, 4), scales),
            (y.shape[1], K, K // 4), {"BLOCK_N": 16, "BLOCK_W": 16, "SPLIT": 1}, pdl)
    return y


def _int4_matvec(x, qweight, scales, zeros, group_size, counters, config, pdl=False):
    M, K = x.shape
    y = torch.empty(M, qweight.shape[0], dtype=x.dtype, device=x.device)
    _launch(_int4_tuned, _int4_kernel, y, counters, config, (x.contiguous(), _words(qweight, 8), scales, zeros),
            (y.shape[1], K, K // 8, group_size), {"BLOCK_N": 16, "BLOCK_W": max(16, group_size // 8), "SPLIT": 1},
            pdl)
    return y


# With PDL (or AS_OP) the kernels are custom ops: torch.compile calls them as they are, where it would otherwise trace
# the Triton kernel and launch it its own way, without the launch attribute. They leave the counters as they found
# them (zero), so they are declared as mutating nothing.
@torch.library.custom_op("llmip::int8_matvec_op", mutates_args=())
def _int8_matvec_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, counters: torch.Tensor | None,
                    pdl: bool) -> torch.Tensor:
    return _int8_matvec(x, qweight, scales, counters, None, pdl)


@torch.library.custom_op("llmip::int4_matvec_op", mutates_args=())
def _int4_matvec_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, counters: torch.Tensor | None, pdl: bool) -> torch.Tensor:
    return _int4_matvec(x, qweight, scales, zeros, group_size, counters, None, pdl)


@_int8_matvec_op.register_fake
def _(x, qweight, scales, counters, pdl):
    return x.new_empty(x.shape[0], qweight.shape[0])


@_int4_matvec_op.register_fake
def _(x, qweight, scales, zeros, group_size, counters, pdl):
    return x.new_empty(x.shape[0], qweight.shape[0])
