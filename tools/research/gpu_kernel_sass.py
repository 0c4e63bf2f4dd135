"""Count what the decode kernel's main loop executes, without a GPU: compile `_attend_chunk` for sm_90 with the
ptxas that ships inside the triton wheel, disassemble it, and print registers, shared memory and the opcode
mix of the loop body (instructions per warp per block of BLOCK_N keys).

    PYTHONPATH=src python tools/research/gpu_kernel_sass.py                # 2, 3 and 4 bits, GQA 4
    PYTHONPATH=src python tools/research/gpu_kernel_sass.py --bits 2 --group 6
    PYTHONPATH=src python tools/research/gpu_kernel_sass.py --registers    # decode_mma (Gluon), per loop
    PYTHONPATH=src python tools/research/gpu_kernel_sass.py --registers --maxnreg 128   # capped: spills?
    PYTHONPATH=src python tools/research/gpu_kernel_sass.py --registers --bits 4 --lookup  # keys from the table
    PYTHONPATH=src python tools/research/gpu_kernel_sass.py --registers --block-keys 64   # 64 keys per step
    PYTHONPATH=src python tools/research/gpu_kernel_sass.py --registers --bits 4 --group 6 --warps 2  # two warps
    PYTHONPATH=src python tools/research/gpu_kernel_sass.py --registers --bits 4 --group 6 --warps 2 --no-padding

With `--registers` it compiles the register-fragment kernel (`kernels/decode_mma.py`) instead and prints each
of its loops (one per decoder: symmetric and general 4-bit), per warp per block of 32 keys, with the share of
integer-ALU instructions (PRMT, LOP3, SHF, ISETP, LEA, FSEL, FMNMX, IADD3), the pipe that bounds it, and what
each program executes outside the loops (its prologue and its partial result).

What it told us (docs/benchmarks.md, "GPU speed"): the loop was ~2 050–2 500 instructions per warp per 128 keys,
about half of them decoding (shift, mask, lane index, shuffle, pack per code); looking 2-bit codes up in pairs
and decoding 4-bit ones with byte permutes took it to 1 447 and 1 725 (3 bits: 2 498). Counts are static (one
pass through the loop body) and depend on the triton version; which instructions bound the time, only a
profiler says (`gpu_decode_once.py`).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tqlab.kernels import decode, decode_mma

POINTERS = {
    "query": "*fp32", "k_codes": "*u8", "k_norms": "*fp16", "v_codes": "*u8", "v_norms": "*fp16",
    "k_table": "*fp16", "v_table": "*fp16", "lengths": "*i32", "starts": "*i32", "part_out": "*fp32",
    "part_lse": "*fp32", "scale_log2": "fp32", "key_mean": "*fp32", "value_mean": "*fp32",
}  # fmt: skip
OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
LABEL = re.compile(r"(\.L_x_\d+):")
ALU = ("PRMT", "LOP3", "SHF", "ISETP", "LEA", "FSEL", "FMNMX", "IADD3", "SEL")
BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loops(sass: str) -> list[collections.Counter]:
    """Opcodes of each backward branch's body that issues tensor-core instructions, longest first."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    spans = [
        (labels[m.group(1)], i)
        for i, line in enumerate(lines)
        if (m := BRANCH.search(line)) and labels.get(m.group(1), i) < i
    ]
    counted = [
        collections.Counter(m.group(1) for line in lines[a : b + 1] if (m := OPCODE.match(line)))
        for a, b in sorted(spans, key=lambda span: span[0] - span[1])
    ]
    return [c for c in counted if c["HMMA"]]


def main_loop(sass: str) -> collections.Counter:
    """Opcodes of the longest loop: the loop over blocks of keys."""
    return loops(sass)[0]


def disassemble(kernel, name: str) -> tuple[str, str]:
    """(registers, SASS) of a compiled kernel, through the cuobjdump and nvdisasm inside the triton wheel."""
    cubin = f"/tmp/tqlab_{name}.cubin"
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    return re.search(r"REG:(\d+)", usage).group(1), sass


def register_kernel(
    bits: int,
    group: int,
    dim: int,
    maxnreg: int = 0,
    means: bool = False,
    lookup: bool = False,
    keys: int = 0,
    warps: int = 1,
    padded: bool = True,
) -> None:
    """Compile `decode_mma._attend_chunk_mma` for sm_90 (strides and code pointers 16-byte aligned, as the
    JIT specialises them on a GPU) and print its loops."""
    from triton.experimental.gluon._runtime import GluonASTSource

    constants = dict(
        KV_HEADS=8, GROUP=group, Q_LEN=1, DIM=dim, K_BITS=bits, V_BITS=bits, ROWS=max(8, group), PADDED=padded,
        BLOCK_N=keys or decode_mma.block_keys(dim), KEY_MEAN=means, VALUE_MEAN=means, LOOKUP_KEYS=lookup, WARPS=warps,
    )  # fmt: skip
    names = decode_mma._attend_chunk_mma.arg_names
    signature = {n: "constexpr" if n in constants else POINTERS.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if "stride" in n or "codes" in n}
    source = GluonASTSource(
        fn=decode_mma._attend_chunk_mma, signature=signature, constexprs=constants, attrs=aligned
    )
    options = {**decode_mma.LAUNCH, "num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    registers, sass = disassemble(kernel, f"decode_mma_{bits}")
    print(f"K{bits}V{bits}: {registers} registers, {kernel.metadata.shared} B shared memory")
    for loop in loops(sass):
        total, alu = sum(loop.values()), sum(loop[op] for op in ALU)
        mix = ", ".join(f"{op} {n}" for op, n in loop.most_common(10))
        spills = loop["LDL"] + loop["STL"]
        print(
            f"  loop: {total} instructions per warp per block, {alu} ({alu / total:.0%}) integer-ALU, "
            f"{spills} local (spill) loads/stores: {mix}"
        )
    # the prologue (query, tables) and the epilogue (the chunk's partial result), once per program
    outside = collections.Counter(m.group(1) for line in sass.splitlines() if (m := OPCODE.match(line)))
    for loop in loops(sass):
        outside -= loop
    mix = ", ".join(f"{op} {n}" for op, n in outside.most_common(10))
    print(f"  outside the loops: {sum(outside.values())} instructions per warp per program: {mix}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--registers", action="store_true", help="the register-fragment kernel (decode_mma)")
    parser.add_argument("--maxnreg", type=int, default=0, help="with --registers: cap registers per thread")
    parser.add_argument("--means", action="store_true", help="centered codes' mean terms")
    parser.add_argument(
        "--no-padding", action="store_true",
        help="with --registers: as launched without left padding (ptxas may allocate registers differently)",
    )  # fmt: skip
    parser.add_argument(
        "--lookup", action="store_true", help="with --registers: 3- and 4-bit keys from the pair table"
    )
    parser.add_argument(
        "--block-keys", type=int, default=0, help="with --registers: keys per step (0: the library's)"
    )
    parser.add_argument(
        "--warps", type=int, default=1, help="with --registers: warps per program (2: d = 128)"
    )
    args = parser.parse_args()
    if args.registers:
        print(f"triton {triton.__version__}, sm_90, decode_mma, head_dim {args.dim}, group {args.group}")
        for bits in args.bits:
            lookup = args.lookup and bits in decode_mma.PAIR_COPIES
            register_kernel(
                bits, args.group, args.dim, args.maxnreg, args.means, lookup, args.block_keys, args.warps,
                not args.no_padding,
            )  # fmt: skip
        return
    print(f"triton {triton.__version__}, sm_90, {decode.NUM_WARPS} warps, {decode.NUM_STAGES} stages, "
          f"BLOCK_N {decode.BLOCK_N}, head_dim {args.dim}, group {args.group}")  # fmt: skip
    for bits in args.bits:
        constants = dict(
            KV_HEADS=8, GROUP=args.group, Q_LEN=1, DIM=args.dim, K_BITS=bits, V_BITS=bits,
            BLOCK_M=max(16, triton.next_power_of_2(args.group)), BLOCK_N=decode.BLOCK_N, PERMUTE=True, PADDED=True,
            K_SKETCH=False, V_SKETCH=False, KEY_MEAN=args.means, VALUE_MEAN=args.means,
        )  # fmt: skip
        signature = {
            name: "constexpr" if name in constants else POINTERS.get(name, "i32")
            for name in decode._attend_chunk.arg_names
        }
        kernel = triton.compile(
            ASTSource(fn=decode._attend_chunk, signature=signature, constexprs=constants),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=decode.NUM_WARPS, num_stages=decode.NUM_STAGES),
        )
        registers, sass = disassemble(kernel, f"decode_{bits}")
        loop = main_loop(sass)
        mix = ", ".join(f"{op} {n}" for op, n in loop.most_common(10))
        print(f"K{bits}V{bits}: {registers} registers, {kernel.metadata.shared} B shared memory; "
              f"loop {sum(loop.values())} instructions per warp per block: {mix}")  # fmt: skip


if __name__ == "__main__":
    main()
