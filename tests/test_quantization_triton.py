"""Our Triton INT8/INT4 matrix-vector kernels and INT4 GEMM against the float reference (dequantized weights).

Triton's CPU interpreter runs the kernel code here; it must be switched on before Triton is imported, so the checks
run in a fresh process. On a GPU, quantization/gpu_bench.py reports the same error for the compiled kernels."""
import pytest
import torch
from triton_interpreter import run_interpreted

from quantization.linear import Int4Linear, Int8Linear, set_backend


def check_kernels() -> None:
    from quantization.triton_gemv import int4_matvec, int8_matvec, split_counters
    torch.manual_seed(0)
    for n, k, rows in [(40, 256, 1), (24, 320, 3)]:  # N not a multiple of the channel block; K not of BLOCK_K
        linear = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(rows, k)
        counters = split_counters(rows, n, "cpu")
        q8 = Int8Linear.from_linear(linear)
        expected = x @ q8.dequantized_weight().T
        for split in (1, 3):  # split-K: 3 programs share each row's tiles (the last one gets fewer), then one adds up
            got = int8_matvec(x, q8.qweight, q8.scales, counters, {"BLOCK_N": 16, "BLOCK_W": 16, "SPLIT": split})
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for group_size, symmetric in [(64, False), (32, True)] + [(128, False)] * (k % 128 == 0):
            q4 = Int4Linear.from_linear(linear, group_size, symmetric)
            expected = x @ q4.dequantized_weight().T
            for split in (1, 3):
                config = {"BLOCK_N": 16, "BLOCK_W": group_size // 8, "SPLIT": split}
                got = int4_matvec(x, q4.qweight, q4.scales, q4.zeros, group_size, counters, config)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert not counters.any()  # every launch leaves the split counters zero for the next one
    # A wrong nibble order or group index is far outside these bounds: swap the nibbles and it must fail.
    swapped = (q4.qweight >> 4) | ((q4.qweight & 0xF) << 4)
    assert not torch.allclose(int4_matvec(x, swapped, q4.scales, q4.zeros, 32), expected, atol=1e-2)
    with pytest.raises(ValueError, match="powers of two"):  # a tile must hold whole groups
        int4_matvec(x, q4.qweight, q4.scales, q4.zeros, 40)
    with pytest.raises(ValueError, match="too few"):
        int4_matvec(x, q4.qweight, q4.scales, q4.zeros, 32, split_counters(1, 8, "cpu"))


def check_half2_kernel() -> None:
    """The f16x2 INT4 kernel's layout, scaling and group arithmetic (the interpreter computes each word's sum in
    float32 from the same float16 x; the PTX is checked on a GPU): x rounded to float16 is the only error left."""
    from quantization.triton_gemv import split_counters
    from quantization.triton_gemv_half2 import int4_matvec_half2
    torch.manual_seed(0)
    for n, k, rows in [(40, 256, 1), (24, 320, 3)]:
        linear = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(rows, k) * torch.logspace(-3, 3, k)  # groups of very different sizes: each its own scale
        counters = split_counters(rows, n, "cpu")
        for group_size, symmetric in [(64, False), (32, True)]:
            q4 = Int4Linear.from_linear(linear, group_size, symmetric)
            expected = x @ q4.dequantized_weight().T
            for split in (1, 3):
                config = {"BLOCK_N": 16, "BLOCK_W": group_size // 8, "SPLIT": split}
                got = int4_matvec_half2(x, q4.qweight, q4.scales, q4.zeros, group_size, counters, config)
                assert ((got - expected).norm() / expected.norm()).item() < 2e-3
        assert not counters.any()
    swapped = (q4.qweight >> 4) | ((q4.qweight & 0xF) << 4)  # a wrong nibble order is far outside that bound
    got = int4_matvec_half2(x, swapped, q4.scales, q4.zeros, group_size)
    assert ((got - expected).norm() / expected.norm()).item() > 0.1


def test_half2_matvec_kernel_interpreted():
    if torch.cuda.is_available():
        pytest.skip("checked compiled, with its PTX, by the GPU test below")
    run_interpreted("from test_quantization_triton import check_half2_kernel\ncheck_half2_kernel()\n")


@pytest.mark.gpu
def test_half2_matvec_every_config_on_gpu():
    """The f16x2 INT4 kernel, PTX included, against the float reference on a GPU: every tile unsplit and every split of
    one tile, then tuned, for x with groups of very different sizes."""
    from quantization.triton_gemv import CONFIGS, split_counters
    from quantization.triton_gemv_half2 import int4_matvec_half2
    torch.manual_seed(0)
    linear = torch.nn.Linear(2048, 200, bias=False).cuda()
    x = (torch.randn(1, 2048, device="cuda") * torch.logspace(-3, 3, 2048, device="cuda")).to(torch.bfloat16)
    q4 = Int4Linear.from_linear(linear, 128)
    expected = x.float() @ q4.dequantized_weight().float().T
    counters = split_counters(1, 200, "cuda")
    for c in [*CONFIGS, None]:
        if c and c.kwargs["SPLIT"] > 1 and (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"]) != (16, 128):
            continue
        config = c and {**c.kwargs, "num_warps": c.num_warps}
        got = int4_matvec_half2(x, q4.qweight, q4.scales, q4.zeros, 128, counters, config).float()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-2, str(c)  # bfloat16 y: ~4e-3
    assert not counters.any()


def test_triton_matvec_kernels_match_dequantized_reference_interpreted():
    if torch.cuda.is_available():  # the GPU test below checks the compiled kernels there
        pytest.skip("on a GPU machine the compiled kernels are checked instead (its older Triton's interpreter "
                    "fails on this kernel's index arithmetic)")
    run_interpreted("from test_quantization_triton import check_kernels\ncheck_kernels()\n")


@pytest.mark.gpu
def test_triton_backend_matches_dequant_on_gpu():
    linear = torch.nn.Linear(512, 96, bias=True).cuda().to(torch.bfloat16)
    x = torch.randn(2, 1, 512, device="cuda", dtype=torch.bfloat16)
    for module in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 128)):
        expected = module(x)  # the dequant backend
        set_backend(module, "triton")
        torch.testing.assert_close(module(x), expected, rtol=2e-2, atol=2e-2)
        assert not module.split_counters.any()


@pytest.mark.gpu
def test_triton_matvec_every_config_on_gpu():
    """Every split with one tile, every tile unsplit, against the float reference on a GPU (the tuner picks one)."""
    from quantization.triton_gemv import CONFIGS, int4_matvec, int8_matvec, split_counters
    torch.manual_seed(0)
    linear = torch.nn.Linear(2048, 200, bias=False).cuda()
    x = torch.randn(1, 2048, device="cuda")
    q8, q4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 128)
    counters = split_counters(1, 200, "cuda")
    for c in CONFIGS:
        if c.kwargs["SPLIT"] > 1 and (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"]) != (16, 128):
            continue
        config = {**c.kwargs, "num_warps": c.num_warps}
        got8 = int8_matvec(x, q8.qweight, q8.scales, counters, config)
        torch.testing.assert_close(got8, x @ q8.dequantized_weight().T, rtol=1e-4, atol=1e-4, msg=str(c))
        got4 = int4_matvec(x, q4.qweight, q4.scales, q4.zeros, 128, counters, config)
        torch.testing.assert_close(got4, x @ q4.dequantized_weight().T, rtol=1e-4, atol=1e-4, msg=str(c))
    assert not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("half2", [False, True])
def test_triton_matvec_pdl_matches_plain_launch_on_gpu(half2):
    """Launched with programmatic dependent launch (custom ops under torch.compile, replayed from a CUDA graph), the
    kernels give what they give launched plainly: bit for bit, or with the f16x2 kernel (whose x preparation
    torch.compile then fuses, summing x in its own order) within float32 rounding."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    from quantization import triton_gemv, triton_gemv_half2
    torch.manual_seed(0)
    first, second = torch.nn.Linear(2048, 1024, bias=False), torch.nn.Linear(1024, 4096, bias=False)
    model = torch.nn.Sequential(Int4Linear.from_linear(first, 128), torch.nn.ReLU(), Int8Linear.from_linear(second))
    model = model.cuda().to(torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    reference = model(x)  # the dequant backend
    set_backend(model, "triton")
    triton_gemv_half2.ENABLED = half2
    try:
        expected = model(x)
        torch.testing.assert_close(expected, reference, rtol=2e-2, atol=2e-2)
        tol = 1e-3 if half2 else 0.0
        triton_gemv.use_pdl(True)
        step = torch.compile(model, dynamic=False)
        torch.testing.assert_close(step(x), expected, rtol=tol, atol=tol)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x)
        graph.replay()
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    finally:
        triton_gemv.use_pdl(False)
        triton_gemv_half2.ENABLED = False
    assert not model[0].split_counters.any()


GEMM_SHAPES = [(64, 128, 32), (96, 256, 128), (40, 192, 64)]  # (N, K, group): N not a multiple of BLOCK_N


def check_gemm(device: str = "cpu", dtype=torch.float32, tol: float = 1e-4) -> None:
    """int4_matmul against x @ W^T in float64, max error relative to the output's scale; then swapped nibbles fail."""
    from quantization.packing import pack_int4
    from quantization.rtn import dequantize_int4
    from quantization.triton_gemm import FACTORED_MAX_ROWS, int4_matmul
    torch.manual_seed(0)
    for n, k, group in GEMM_SHAPES:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
        scales = (torch.rand(n, k // group, device=device) * 0.1 + 0.01).to(dtype)
        for zeros in (torch.full_like(scales, 8, dtype=torch.uint8),  # symmetric
                      torch.randint(0, 16, scales.shape, dtype=torch.uint8, device=device)):
            qweight = pack_int4(codes)
            w = dequantize_int4(codes, scales, zeros).double()
            # A K tile spanning several groups (each group's scale over its own columns), where K allows one.
            # (The factored kernel, the table's choice up to FACTORED_MAX_ROWS rows, takes K tiles within a group.)
            wide = next(({"BLOCK_K": bk, "FACTORED": False} for bk in (256, 128, 64) if bk > group and k % bk == 0),
                        None)
            for rows in (1, 9, 33):  # M tiles of 16 and 64: ragged edges
                x = torch.randn(rows, k, device=device).to(dtype)
                expected = x.double() @ w.T
                # The table's split-K, none, and one that leaves a program no K tile; then the wide tile.
                # Every row count through both kernels: the table's choice and the other one.
                other = {"FACTORED": rows > FACTORED_MAX_ROWS, "BLOCK_K": min(group, 64)}
                for split, config in ((None, None), (1, None), (3, None), (2, wide), (None, other)):
                    got = int4_matmul(x, qweight, scales, zeros, group, split, config)
                    assert got.dtype == dtype and got.shape == (rows, n)
                    err = (got.double() - expected).abs().max() / expected.abs().max()
                    assert err < tol, (f"N={n} K={k} group={group} M={rows} split={split} {config}: "
                                       f"relative error {err:.2e}")
    # A wrong nibble order is far outside the bound: the same check on swapped bytes must fail.
    swapped = (qweight >> 4) | ((qweight & 0xF) << 4)
    err = (int4_matmul(x, swapped, scales, zeros, group).double() - expected).abs().max() / expected.abs().max()
    assert err > 0.1, f"swapped nibbles passed (relative error {err:.2e})"


def check_gemm_module(device: str = "cpu", dtype=torch.float32, tol: float = 1e-4) -> None:
    """An Int4Linear's own buffers through int4_matmul (12 rows, bias) against its "dequant" backend, and
    int4_dequantize (the path past DEQUANT_MIN_ROWS) against the module's own dequantized weight, bit for bit."""
    from quantization.triton_gemm import int4_dequantize, int4_matmul
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 72, bias=True).to(device, dtype)
    module = Int4Linear.from_linear(linear, 64)
    x = torch.randn(3, 4, 256, device=device, dtype=dtype)
    expected = module(x)  # the dequant backend
    got = int4_matmul(x.reshape(12, 256), module.qweight, module.scales, module.zeros, 64).reshape(3, 4, 72)
    torch.testing.assert_close(got + module.bias, expected, rtol=tol, atol=tol)
    w = int4_dequantize(module.qweight, module.scales, module.zeros, 64, dtype)
    assert torch.equal(w, module.dequantized_weight().to(dtype))
    swapped = (module.qweight >> 4) | ((module.qweight & 0xF) << 4)
    assert not torch.equal(int4_dequantize(swapped, module.scales, module.zeros, 64, dtype), w)


def test_triton_gemm_matches_dequantized_reference_interpreted():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the compiled kernel is checked instead")
    run_interpreted("from test_quantization_triton import check_gemm, check_gemm_module\n"
                    "import torch\ncheck_gemm()\ncheck_gemm(dtype=torch.float16, tol=1e-2)\ncheck_gemm_module()\n")


@pytest.mark.gpu
def test_triton_gemm_on_gpu():
    """The compiled kernel in bfloat16 (rounding W to bfloat16 costs ~1e-3 of the output scale), and the module's
    routing: 12 and 2 rows take the GEMM, one row the matrix-vector kernel, 300 rows the Triton dequantization and
    cuBLAS, all equal to the dequant backend."""
    check_gemm("cuda", torch.bfloat16, 1e-2)
    check_gemm_module("cuda", torch.bfloat16, 2e-2)
    linear = torch.nn.Linear(512, 96, bias=True).cuda().to(torch.bfloat16)
    module = Int4Linear.from_linear(linear, 128)
    for shape in ((3, 4, 512), (2, 1, 512), (1, 1, 512), (300, 512)):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        module.backend = "dequant"
        expected = module(x)
        module.backend = "triton"
        torch.testing.assert_close(module(x), expected, rtol=2e-2, atol=2e-2)


def test_kernel_sass_counts_the_longest_loop():
    """kernel_sass.py's parser on a hand-written disassembly: the outer loop (the longest backward branch) is
    counted, predicated instructions by their opcode, the code before and after it not at all."""
    from quantization.kernel_sass import loop_opcodes
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.64 R4, desc[UR6][R10.64] ;
.L_x_2:
        /*0020*/                   FFMA R22, R25, R22, R16 ;
        /*0030*/               @P0 BRA `(.L_x_2) ;
        /*0040*/              @!P1 LOP3.LUT R25, R18, 0x3f800000, R25, 0xec, !PT ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/                   EXIT ;
"""
    assert loop_opcodes(sass) == {"LDG": 1, "FFMA": 1, "BRA": 2, "LOP3": 1}
