"""Bit packing against a brute-force bit-string construction."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tqlab.quant import pack_bits, packed_row_bytes, unpack_bits


def reference_pack(row: list[int], bits: int) -> list[int]:
    stream = []
    for v in row + [0] * (-len(row) % 8):
        stream += [(v >> k) & 1 for k in range(bits)]  # little-endian bit stream
    return [sum(bit << k for k, bit in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8)]


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 3), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_matches_bitstream_reference_and_round_trips(bits, rows, n, seed):
    values = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(n, bits))
    for r in range(rows):
        assert packed[r].tolist() == reference_pack(values[r].tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), values)
    as_int32 = unpack_bits(packed, bits, n, torch.int32)  # what the decoders gather centroids with
    assert as_int32.dtype == torch.int32 and torch.equal(as_int32.long(), values)


def test_flags_strided_rows_and_no_rows_pack_as_contiguous_integers():
    """The 1/2/4-bit fold reads rows as machine words: a bool input, a transposed view and zero rows must
    pack as the same values would, contiguous and integer."""
    values = torch.randint(0, 2, (24, 5), generator=torch.Generator().manual_seed(0))
    for bits in (1, 2, 4):
        strided = values.T  # [5, 24], not contiguous
        assert torch.equal(pack_bits(strided, bits), pack_bits(strided.contiguous(), bits))
    assert torch.equal(pack_bits(values.T.bool(), 1), pack_bits(values.T, 1))
    for r in range(5):
        assert pack_bits(values.T.bool(), 1)[r].tolist() == reference_pack(values[:, r].tolist(), 1)
    assert pack_bits(torch.zeros(0, 16, dtype=torch.uint8), 2).shape == (0, 4)
    codes = torch.randint(0, 2, (3, 12), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    for view in (codes[0, 3:11], codes[:1, :8], codes[:, 4:]):  # uint8 at an odd offset or stride
        assert pack_bits(view, 1).tolist() == pack_bits(view.clone().long(), 1).tolist()


def test_packed_size_is_tight_when_n_is_a_multiple_of_8():
    for bits in range(1, 9):
        assert packed_row_bytes(128, bits) * 8 == 128 * bits


def test_unpack_refuses_wrong_row_length():
    import pytest

    with pytest.raises(ValueError, match="rows of 5 bytes"):
        unpack_bits(torch.zeros(2, 5, dtype=torch.uint8), 3, 16)
