"""The register-fragment decode kernel (`kernels/decode_mma.py`, Gluon) cannot run in Triton's interpreter, so on
a CPU it is compiled for sm_90 instead: the conversions of the decoded keys and values into tensor-core
operands are asserted free of data movement at compile time (`assert_trivial`), and the compiled kernel must
use no shared memory, and its loops (one per decoder) no shared-memory instruction and no codebook shuffle —
only the few of the softmax and of P's move into an operand. With 4-bit keys looked up in the pair table
(`LOOKUP_KEYS`, 3 and 4 bits; at K3V3 values too) the tables must be its only shared memory (the lookups address it from the start of the shared
window) and the loop one shared-memory read per byte of key codes. Launched ahead of its merge (`LAUNCH_MERGE`),
it lets the merge launch (PREEXIT) before its first load. Its numbers are checked by test_decode on a GPU."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest
from filelock import FileLock

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

# Compiled in a fresh process, all at once (each process spends seconds importing): the test session runs
# Triton in its interpreter, which cannot compile Gluon. Each job: the attention kernel's constants (its cubin
# and shared memory written to out/i.cubin and out/i.json), {"merge_wait": bool} (the merge's PTX to out/i.ptx),
# or {"tiles": constants} (the Triton-language attention kernel's cubin to out/i.cubin).
COMPILE = """
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from tqlab.kernels import decode, decode_mma

pointers = {
    "query": "*fp32", "k_codes": "*u8", "k_norms": "*fp16", "v_codes": "*u8", "v_norms": "*fp16",
    "k_table": "*fp16", "v_table": "*fp16", "lengths": "*i32", "starts": "*i32", "part_out": "*fp32",
    "part_lse": "*fp32", "scale_log2": "fp32", "key_mean": "*fp32", "value_mean": "*fp32", "out": "*fp32",
    "out_lse": "*fp32", "q_sketch": "*fp32", "k_signs": "*u8", "k_residual_norms": "*fp16", "v_signs": "*u8",
    "v_residual_norms": "*fp16", "k_qjl_scale": "fp32",
}
target = GPUTarget("cuda", 90, 32)
for number, job in enumerate(json.loads(sys.argv[1])):
    out = os.path.join(sys.argv[2], str(number))
    if "merge_wait" in job:
        constants = dict(
            KV_HEADS=8, GROUP=4, Q_LEN=1, DIM=128, BLOCK_M=8, BLOCK_S=256, BLOCK_D=32, WAIT=job["merge_wait"]
        )
        names = decode._merge_chunks.arg_names
        signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
        source = ASTSource(fn=decode._merge_chunks, signature=signature, constexprs=constants)
        open(out + ".ptx", "w").write(triton.compile(source, target=target, options=dict(launch_pdl=True)).asm["ptx"])
        continue
    if "tiles" in job:
        constants = job["tiles"]
        names = decode._attend_chunk.arg_names
        signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
        source = ASTSource(fn=decode._attend_chunk, signature=signature, constexprs=constants)
        options = dict(num_warps=decode.NUM_WARPS, num_stages=decode.NUM_STAGES)
        open(out + ".cubin", "wb").write(triton.compile(source, target=target, options=options).asm["cubin"])
        continue
    names = decode_mma._attend_chunk_mma.arg_names
    signature = {n: "constexpr" if n in job else pointers.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if "stride" in n or "codes" in n}
    source = GluonASTSource(fn=decode_mma._attend_chunk_mma, signature=signature, constexprs=job, attrs=aligned)
    kernel = triton.compile(source, target=target, options={**decode_mma.LAUNCH, "num_warps": job.get("WARPS", 1)})
    open(out + ".cubin", "wb").write(kernel.asm["cubin"])
    open(out + ".json", "w").write(json.dumps({"shared": kernel.metadata.shared}))
"""


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loops(sass: str) -> list[collections.Counter]:
    """Opcodes of each loop (backward branch) of a disassembly that issues tensor-core instructions."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line))}
    opcode = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
    spans = [
        (labels[m.group(1)], i)
        for i, line in enumerate(lines)
        if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i
    ]
    counted = [
        collections.Counter(m.group(1) for line in lines[a : b + 1] if (m := opcode.match(line)))
        for a, b in spans
    ]
    return [c for c in counted if c["HMMA"]]


CASES = [  # dim, k_bits, v_bits, group, q_len, means, lookup, launch_merge
    (128, 4, 4, 4, 1, False, False, True),
    (128, 3, 2, 6, 1, False, False, False),
    (256, 2, 4, 8, 1, False, False, True),
    (64, 4, 2, 4, 4, True, False, False),  # centered codes: the means' terms after the loop
    (64, 3, 3, 4, 1, False, False, True),
    (256, 3, 3, 4, 1, False, False, False),
    (128, 4, 4, 4, 1, False, True, True),  # 3- and 4-bit keys from the pair table
    (128, 4, 3, 8, 1, True, True, False),
    (256, 4, 2, 4, 1, False, True, True),
    (128, 3, 3, 4, 1, False, True, False),
    (256, 3, 4, 2, 2, False, True, True),
]
# Programs of two warps, head_dim 128: bits of keys and values, group, means, launch_merge
TWO_WARP_CASES = [(4, 6, False, True), (3, 6, False, False), (2, 8, True, True)]
MERGE_WAITS = [True, False]
TILES = dict(  # the Triton-language kernel, launched ahead of its merge
    KV_HEADS=8, GROUP=4, Q_LEN=1, DIM=128, K_BITS=4, V_BITS=4, BLOCK_M=16, BLOCK_N=128, PERMUTE=True, PADDED=True,
    K_SKETCH=False, V_SKETCH=False, KEY_MEAN=False, VALUE_MEAN=False, LAUNCH_MERGE=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The folder of every case's compiled kernel (`COMPILE`): CASES first, then the merges of MERGE_WAITS, then
    TILES, then TWO_WARP_CASES."""
    if not (os.path.exists(tool("ptxas")) and os.path.exists(tool("nvdisasm"))):
        pytest.skip("this triton wheel ships no ptxas or nvdisasm")
    from tqlab.kernels import decode_mma

    jobs = [
        dict(
            KV_HEADS=8, GROUP=group, Q_LEN=q_len, DIM=dim, K_BITS=k_bits, V_BITS=v_bits, ROWS=max(8, group * q_len),
            BLOCK_N=decode_mma.block_keys(dim), PADDED=True, KEY_MEAN=means, VALUE_MEAN=means, LOOKUP_KEYS=lookup,
            LAUNCH_MERGE=launch_merge, WARPS=1,
        )
        for dim, k_bits, v_bits, group, q_len, means, lookup, launch_merge in CASES
    ] + [{"merge_wait": wait} for wait in MERGE_WAITS] + [{"tiles": TILES}] + [
        dict(
            KV_HEADS=2, GROUP=group, Q_LEN=1, DIM=128, K_BITS=bits, V_BITS=bits, ROWS=8, BLOCK_N=32, PADDED=True,
            KEY_MEAN=means, VALUE_MEAN=means, LOOKUP_KEYS=False, LAUNCH_MERGE=launch_merge, WARPS=2,
        )
        for bits, group, means, launch_merge in TWO_WARP_CASES
    ]  # fmt: skip
    # Once per test session: pytest-xdist's workers share the folder above their own temporary ones, and a worker
    # that takes some of these tests after another compiled them (--dist worksteal) reads that one's kernels.
    session = tmp_path_factory.getbasetemp()
    folder = (session.parent if os.environ.get("PYTEST_XDIST_WORKER") else session) / "decode_mma_compiled"
    with FileLock(f"{folder}.lock"):
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            done = subprocess.run(
                [sys.executable, "-c", COMPILE, json.dumps(jobs), str(folder)],
                capture_output=True,
                text=True,
                env=env,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            (folder / "done").touch()
    return folder


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i])))
def test_compiles_for_sm90_with_operands_decoded_in_registers(case, compiled):
    from tqlab.kernels import decode_mma

    dim, k_bits, v_bits, group, q_len, means, lookup, launch_merge = CASES[case]
    shared = json.loads((compiled / f"{case}.json").read_text())["shared"]
    assert shared == (decode_mma.pair_table_bytes(k_bits, v_bits) if lookup else 0)
    disassembly = subprocess.run(
        [tool("nvdisasm"), "-c", str(compiled / f"{case}.cubin")], capture_output=True, text=True
    )
    assert disassembly.returncode == 0, disassembly.stderr[-3000:]
    sass = disassembly.stdout
    assert ("PREEXIT" in sass) == launch_merge  # griddepcontrol.launch_dependents
    if launch_merge:  # the merge may launch before the first load of the kernel
        assert sass.index("PREEXIT") < sass.index("LDG")
    found = loops(sass)
    assert len(found) == (2 if 4 in (k_bits, v_bits) else 1)  # a 4-bit side: symmetric and general decode
    rows = max(8, group * q_len)
    for loop in found:  # Sᵀ = K·Qᵀ and Oᵀ = Vᵀ·Pᵀ per block of keys, N = 8 query rows per instruction
        assert loop["HMMA"] == 2 * (dim // 16) * (decode_mma.block_keys(dim) // 16) * (rows // 8)
        # with the table: one read per two of each lane's key codes (BLOCK_N · DIM / 2 pairs per 32 lanes), and
        # at K3V3 as many for the values
        reads = decode_mma.block_keys(dim) * dim // 64 * (2 if k_bits == v_bits == 3 else 1)
        assert loop["LDS"] == (reads if lookup else 0)
        assert not any(op.startswith(("STS", "LDSM")) for op in loop)
        assert loop["SHFL"] <= 32  # a codebook lookup by shuffles would take one per code: hundreds


@pytest.mark.parametrize("wait", MERGE_WAITS)
def test_merge_launched_early_waits_for_the_partial_results(wait, compiled):
    ptx = (compiled / f"{len(CASES) + MERGE_WAITS.index(wait)}.ptx").read_text()
    assert ("griddepcontrol.wait" in ptx) == wait
    if wait:  # before the first read of a partial result
        assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")


def test_the_triton_language_kernel_lets_the_merge_launch_before_its_first_load(compiled):
    cubin = compiled / f"{len(CASES) + len(MERGE_WAITS)}.cubin"
    disassembly = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True)
    assert disassembly.returncode == 0, disassembly.stderr[-3000:]
    assert disassembly.stdout.index("PREEXIT") < disassembly.stdout.index("LDG")


@pytest.mark.parametrize(
    "case", range(len(TWO_WARP_CASES)), ids=lambda i: "-".join(map(str, TWO_WARP_CASES[i]))
)
def test_programs_of_two_warps_split_each_block_between_them(case, compiled):
    """Two-warp programs (`decode_mma._attend_blocks_two_warps`): each warp issues half of a block's tensor-core
    products, the warps meet in a few barriers per block (the maxima and P crossing through shared memory, not
    one exchange per reduction), with no spills and no more registers per thread than one-warp programs take
    (167 with triton 3.6; the two-warp kernel 128 there, 155 with 3.9)."""
    cubin = compiled / f"{len(CASES) + len(MERGE_WAITS) + 1 + case}.cubin"
    usage = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True)
    assert int(re.search(r"REG:(\d+)", usage.stdout).group(1)) <= 168
    sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    bits, _, _, launch_merge = TWO_WARP_CASES[case]
    assert ("PREEXIT" in sass) == launch_merge  # launched ahead of its merge
    assert "LDL" not in sass and "STL" not in sass
    found = loops(sass)
    assert len(found) == (2 if bits == 4 else 1)  # 4 bits: the symmetric and the general decode
    # per warp: Sᵀ of its 16 keys over d = 128 (8 products), Oᵀ of its 64 coordinates over 32 keys (8)
    for loop in found:
        assert loop["HMMA"] == 16
        assert 1 <= loop["BAR"] <= 4
