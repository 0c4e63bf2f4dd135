"""The register-fragment decode kernel (`kernels/decode_mma.py`, Gluon) cannot run in Triton's interpreter, so on
a CPU it is compiled for sm_90 instead: the conversions of the decoded keys and values into tensor-core
operands are asserted free of data movement at compile time (`assert_trivial`), and the compiled kernel must
use no shared memory but to move the query into its operand and its result into the layout it is written in,
and its loops (one per decoder) no shared-memory instruction and no codebook shuffle —
only the few of the softmax and of P's move into an operand. With 4-bit keys looked up in the pair table
(`LOOKUP_KEYS`, 3 and 4 bits; at K3V3 values too) its shared memory must be the tables' size, the moves of the
query and the result reusing their space (the lookups address the tables from the start of the shared window),
and the loop one shared-memory read per byte of key codes. Launched ahead of its merge (`LAUNCH_MERGE`),
it lets the merge launch (PREEXIT) before its first load. Its numbers are checked by test_decode on a GPU."""

import collections
import json
import re
import subprocess

import pytest

import sm90_compile
from sm90_compile import CASES, MERGE_WAITS, TWO_WARP_CASES, tool

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")


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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The folder of every case's compiled kernel (`sm90_compile.COMPILE`, in `sm90_compile.jobs`' order)."""
    if not sm90_compile.available():
        pytest.skip("this triton wheel ships no ptxas or nvdisasm")
    out = sm90_compile.folder(tmp_path_factory)
    sm90_compile.wait(out)
    return out


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i])))
def test_compiles_for_sm90_with_operands_decoded_in_registers(case, compiled):
    from tqlab.kernels import decode_mma

    dim, k_bits, v_bits, group, q_len, means, lookup, launch_merge = CASES[case]
    shared = json.loads((compiled / f"{case}.json").read_text())["shared"]
    rows = max(8, group * q_len)
    if lookup:  # the tables, which the query's and the result's moves reuse, so the tables start at 0
        assert shared == decode_mma.pair_table_bytes(k_bits, v_bits)
    else:  # at most the fp32 Oᵀ [dim, rows] once (`_query_layout`, `_result_layout`)
        assert 0 < shared <= 4 * dim * rows
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
    one exchange per reduction), with no spills in the loop and no more registers per thread than one-warp
    programs take (167 with triton 3.6; the two-warp kernel 128 there, 154-156 with 3.9, whose ptxas keeps K3V3 at
    128 and spills three words across the loop, stored before it and loaded after)."""
    cubin = compiled / f"{len(CASES) + len(MERGE_WAITS) + 1 + case}.cubin"
    usage = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True)
    assert int(re.search(r"REG:(\d+)", usage.stdout).group(1)) <= 168
    sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    bits, _, _, launch_merge = TWO_WARP_CASES[case]
    assert ("PREEXIT" in sass) == launch_merge  # launched ahead of its merge
    found = loops(sass)
    assert len(found) == (2 if bits == 4 else 1)  # 4 bits: the symmetric and the general decode
    # per warp: Sᵀ of its 16 keys over d = 128 (8 products), Oᵀ of its 64 coordinates over 32 keys (8)
    for loop in found:
        assert loop["HMMA"] == 16
        assert 1 <= loop["BAR"] <= 4
        assert loop["LDL"] == loop["STL"] == 0  # a spill in the loop would cost every block
