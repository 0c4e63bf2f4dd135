"""The byte-permute decoders (inline PTX, which only a GPU runs) checked on the CPU: their PTX text executed by a
small emulator of the instructions they use, with the byte tables `_byte_planes` builds (run in Triton's
interpreter), against a direct codebook lookup. On a GPU the same paths are checked end to end by test_decode."""

import re

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from tqlab.kernels import packed  # noqa: E402

MASK32 = 0xFFFFFFFF


def prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte k of the result is byte (nibble k & 7) of {b, a}; nibble bit 3
    replicates that byte's sign bit instead."""
    source = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        nibble = (selector >> 4 * k) & 0xF
        byte = source[nibble & 7]
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * k
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX lop3.b32: bit i of the result is bit (a_i·4 + b_i·2 + c_i) of the lookup table."""
    return sum(
        ((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1) << i for i in range(32)
    )


OPS = {
    "and.b32": lambda a: a[0] & a[1],
    "shl.b32": lambda a: (a[0] << a[1]) & MASK32,
    "shr.b32": lambda a: a[0] >> a[1],
    "prmt.b32": lambda a: prmt(*a),
    "lop3.b32": lambda a: lop3(*a),
    "or.b32": lambda a: a[0] | a[1],
    "xor.b32": lambda a: a[0] ^ a[1],
    "mul.lo.u32": lambda a: (a[0] * a[1]) & MASK32,
}


def run_ptx(asm: str, operands: dict) -> dict:
    """Execute the instructions the decode's PTX uses (and, shl, shr, prmt, lop3, mov.b32 {lo, hi})."""
    regs = dict(operands)

    def value(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0)

    for statement in asm.replace("{ .reg", "; .reg").split(";"):
        statement = statement.strip().strip("{}").strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, rest = statement.split(None, 1)
        if op == "mov.b32":
            low, high, source = re.match(r"\{\s*(\S+),\s*(\S+)\s*\},\s*(\S+)", rest).groups()
            regs[low], regs[high] = value(source) & 0xFFFF, value(source) >> 16
            continue
        dest, *args = [a.strip() for a in rest.split(",")]
        regs[dest] = OPS[op]([value(x) for x in args])
    return regs


def planes(codebook_bits: list, first: int) -> tuple:
    """Low and high bytes of c[first .. first + 7] packed four to a word, little end first."""
    word = lambda values: sum(v << 8 * i for i, v in enumerate(values))  # noqa: E731
    entries = codebook_bits[first : first + 8]
    low, high = [e & 0xFF for e in entries], [e >> 8 for e in entries]
    return word(low[:4]), word(low[4:]), word(high[:4]), word(high[4:])


def fp16_bits(codebook: np.ndarray) -> list:
    return [int(b) for b in codebook.astype(np.float16).view(np.uint16)]


def test_the_permute_ptx_decodes_every_code_of_random_codebooks():
    asm = packed.PERMUTE4_ASM.value
    rng = np.random.default_rng(0)
    for trial in range(200):
        codebook = fp16_bits(np.sort(rng.standard_normal(16)))  # any 16 entries: no symmetry assumed
        word = int(rng.integers(0, 2**32))
        operands = {f"${8 + i}": v for i, v in enumerate((word, *planes(codebook, 0), *planes(codebook, 8)))}
        regs = run_ptx(asm, operands)
        assert [regs[f"${e}"] for e in range(8)] == [codebook[(word >> 4 * e) & 15] for e in range(8)], trial


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_register_kernel_decoders_emit_each_code_in_their_stated_order(bits):
    """The decoders `decode_mma` uses: output j of a group is the centroid of code CODE_ORDER_<bits> nibble j."""
    asm = {2: packed.DECODE2_ASM, 3: packed.DECODE3_ASM, 4: packed.PERMUTE4_ASM}[bits].value
    order = getattr(packed, f"CODE_ORDER_{bits}").value
    assert sorted((order >> 4 * j) & 15 for j in range(8)) == list(range(8))
    rng = np.random.default_rng(bits)
    for trial in range(200):
        codebook = fp16_bits(np.sort(rng.standard_normal(2**bits)))
        group = int(rng.integers(0, 2 ** (8 * bits)))
        tables = planes(codebook + [0] * 16, 0) + planes(codebook + [0] * 16, 8)
        if bits == 2:  # low and high bytes of c[0..3] only
            tables = (tables[0], tables[2])
        operands = {f"${8 + i}": v for i, v in enumerate((group, *tables))}
        regs = run_ptx(asm, operands)
        codes = [(group >> bits * ((order >> 4 * j) & 15)) & (2**bits - 1) for j in range(8)]
        assert [regs[f"${j}"] for j in range(8)] == [codebook[c] for c in codes], trial


def test_the_sign_magnitude_decoder_matches_a_lookup_of_labels_in_any_symmetric_codebook():
    """`packed.DECODE4_SIGN_MAGNITUDE_ASM` reads only c[0..7]: label l >= 8 is −c[l & 7], the codec's index l ^ 7
    (c[15 − i] = −c[i]); `sign_magnitude` relabels packed bytes so, and back."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        half = np.sort(rng.standard_normal(8)).astype(np.float16)
        centroids = np.concatenate([half, -half[::-1]])
        codebook = fp16_bits(centroids)
        table = fp16_bits(packed.centroid_table(torch.from_numpy(centroids), sign_magnitude=True).numpy())
        assert table[:8] == codebook[:8] and table[8:] == codebook[8:][::-1]
        indices = rng.integers(0, 256, size=4, dtype=np.uint8)  # a group of 8 codes as packed bytes
        labels = packed.sign_magnitude(torch.from_numpy(indices)).numpy()
        assert np.array_equal(packed.sign_magnitude(torch.from_numpy(labels)).numpy(), indices)
        group = int(labels.view("<u4")[0])
        operands = {f"${8 + i}": v for i, v in enumerate((group, *planes(codebook, 0)))}
        regs = run_ptx(packed.DECODE4_SIGN_MAGNITUDE_ASM.value, operands)
        index = [(int(indices[j // 2]) >> 4 * (j % 2)) & 15 for j in range(8)]  # code j: nibble j, low first
        assert [regs[f"${j}"] for j in range(8)] == [codebook[i] for i in index], trial
        assert [table[(group >> 4 * j) & 15] for j in range(8)] == [codebook[i] for i in index], trial


def test_byte_planes_match_the_packing_the_ptx_reads():
    @triton.jit
    def kernel(table, out):
        codebook = tl.load(table + tl.arange(0, 16))
        a0, a1, a2, a3 = packed._byte_planes(codebook, 0)
        b0, b1, b2, b3 = packed._byte_planes(codebook, 8)
        tl.store(out + 0, a0)
        tl.store(out + 1, a1)
        tl.store(out + 2, a2)
        tl.store(out + 3, a3)
        tl.store(out + 4, b0)
        tl.store(out + 5, b1)
        tl.store(out + 6, b2)
        tl.store(out + 7, b3)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    codebook = torch.linspace(-2.7, 2.7, 16).half()
    out = torch.zeros(8, dtype=torch.int32, device=device)
    kernel[(1,)](codebook.to(device), out)
    bits = fp16_bits(codebook.numpy())
    expected = [v - 2**32 if v >= 2**31 else v for v in (*planes(bits, 0), *planes(bits, 8))]  # as int32
    assert out.cpu().tolist() == expected
