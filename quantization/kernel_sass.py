"""Instructions per weight in the hot loop of our INT4/INT8 kernels, from the machine code, without a GPU.

A matrix-vector product at batch 1 reads each weight once, so a kernel can only keep up with the memory if it issues
few instructions per weight: an H100 moves about 6e12 INT4 weights a second and issues about 3e13 thread
instructions a second, so 5 instructions per weight is already the whole instruction budget. This compiles
triton_gemm.py's two GEMM kernels (plain: scale and zero applied to every weight; factored: once per group) and
triton_gemv.py's matrix-vector kernels (gemv4, gemv8) and triton_gemv_half2.py's (gemv4h2) for sm_90 with Triton's
own ptxas, disassembles them with its nvdisasm, and counts the instructions of the K loop (the longest backward
branch) per weight a thread handles, by opcode. Counting is not timing: memory stalls and the tensor cores'
throughput are not in it (gemm_tiles.py and gemm_bench.py time the kernels on a GPU).

    python -m quantization.kernel_sass                       # one row: BLOCK_M 16, a few tile shapes
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

from core.errors import UserError, cli

# (kernel, BLOCK_N, BLOCK_K, warps, stages): the table's tile for few rows (plain), its factored counterparts, and
# matrix-vector tiles (BLOCK_K counts 32-bit words there: BLOCK_W).
CASES = (("plain", 64, 256, 4, 4), ("plain", 64, 128, 4, 4), ("factored", 64, 128, 4, 4), ("factored", 128, 128, 8, 4),
         ("gemv4", 16, 128, 4, 1), ("gemv4", 8, 256, 4, 1), ("gemv8", 16, 128, 4, 1), ("gemv8", 32, 256, 8, 1),
         ("gemv4h2", 16, 128, 4, 1), ("gemv4h2", 8, 256, 4, 1), ("gemv4h2", 32, 128, 8, 1))
WEIGHTS_PER_K = {"plain": 1, "factored": 1, "gemv4": 8, "gemv8": 4, "gemv4h2": 8}  # per unit of BLOCK_K (gemv: a word)
ARGS = {"x_ptr": "*bf16", "s_ptr": "*bf16", "z_ptr": "*u8", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
        "SPLIT": "i32"}


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes between the target of the longest backward branch and that branch: the kernel's main loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    loop = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and (loop is None or i - labels[m.group(1)] > loop[1] - loop[0]):
            loop = (labels[m.group(1)], i)
    if loop is None:
        raise UserError("no loop found in the disassembly")
    ops = collections.Counter()
    for line in lines[loop[0]:loop[1] + 1]:
        if m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line):
            ops[m.group(1)] += 1
    return ops


def compile_sass(kernel: str, block_n: int, block_k: int, warps: int, stages: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantization import triton_gemm, triton_gemv, triton_gemv_half2
    if kernel.startswith("gemv"):
        fn = {"gemv4": triton_gemv._int4_kernel, "gemv8": triton_gemv._int8_kernel,
              "gemv4h2": triton_gemv_half2._int4_half2_kernel}[kernel]
        signature = {**ARGS, "xp_ptr": "*i32", "w_ptr": "*i32", "W": "i32", "part_ptr": "*fp32", "count_ptr": "*i32"}
        constants = {"GROUP": 128, "BLOCK_N": block_n, "BLOCK_W": block_k, "SPLIT": 4, "PDL": False, "ASM": True}
    else:
        fn = triton_gemm._int4_gemm_factored_kernel if kernel == "factored" else triton_gemm._int4_gemm_kernel
        signature = {"w_ptr": "*i32" if kernel == "factored" else "*u8", **ARGS}
        constants = {"GROUP": 128, "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "PRECISION": "tf32"}
        constants.update({"OFFSET": 128.0} if kernel == "factored" else {"TILE_GROUPS": max(1, block_k // 128)})
    signature = {name: signature[name] for name in fn.arg_names if name in signature}
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature.update({name: "constexpr" for name in constants})
    # Pointers 16-byte aligned and N, K multiples of 16, as Triton specializes them at a real launch.
    aligned = ("x_ptr", "xp_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "part_ptr", "count_ptr", "N", "K", "W")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned if a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.kernel_sass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=8, help="opcodes listed per kernel")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError("kernel_sass needs Triton (pip install triton); no GPU is needed") from None
    print("INT4 GEMM (BLOCK_M 16: one row of x padded to the tensor cores' 16) and INT4/INT8 matrix-vector kernels, "
          "group 128, sm_90, bfloat16")
    print(f"{'kernel':<10}{'BLOCK_N':>8}{'BLOCK_K':>8}{'warps':>6}{'loop instr.':>12}{'per weight':>11}  top opcodes")
    for kernel, block_n, block_k, warps, stages in CASES:
        ops = loop_opcodes(compile_sass(kernel, block_n, block_k, warps, stages))
        per_thread = block_n * block_k * WEIGHTS_PER_K[kernel] / (32 * warps)  # weights per thread per trip
        total = sum(ops.values())
        print(f"{kernel:<10}{block_n:>8}{block_k:>8}{warps:>6}{total:>12}{total / per_thread:>11.2f}  "
              + " ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
