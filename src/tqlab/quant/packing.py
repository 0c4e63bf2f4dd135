"""Tight bit packing of small unsigned integers along the last axis.

Layout: a little-endian bit stream per row — element i occupies bits [i·b, (i+1)·b) of the row, byte
j holds bits [8j, 8j+8). For b = 4 that is two nibbles per byte (low nibble first), for b = 1 eight
flags per byte (LSB first). Rows whose length is not a multiple of 8 are padded with zero codes to
the next multiple of 8, so a row takes ceil(n/8)·b bytes; the padding is real storage and is counted.
"""

from __future__ import annotations

import torch


def packed_row_bytes(n: int, bits: int) -> int:
    return -(-n // 8) * bits


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2^bits) along the last axis into uint8, `packed_row_bytes(n, bits)` per row."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range 1..8 for pack_bits")
    n = values.shape[-1]
    pad = -n % 8
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    if bits == 8:
        return values.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        # The `per` codes of a byte, one per byte of a little-endian word, folded into its low byte: each
        # step ORs in the word shifted down by (8 − b)·2^i, which moves the codes of bytes 2^i further up
        # next to those below them (3× faster on CPU than a shift-or per code position:
        # tools/research/cpu_quantize_parts.py).
        per = 8 // bits
        codes = values.to(torch.uint8)
        # a view as wider words needs an offset and strides in whole words, which a slice need not have
        # (the words are little-endian, as on x86-64 and ARM64, and as the kernels read them)
        if codes.stride(-1) != 1 or any(s % per for s in (codes.storage_offset(), *codes.stride()[:-1])):
            codes = codes.clone(memory_format=torch.contiguous_format)
        word = codes.view(_FOLD_WORDS[per])
        for step in range(per.bit_length() - 1):
            word = word | (word >> ((8 - bits) << step))
        return word.to(torch.uint8)  # the low byte
    # Eight b-bit values make one 8b-bit word (at most 56 bits: fits int64; 24 at 3 bits: int32, half the
    # traffic), split into b bytes.
    word = _word_dtype(bits)
    groups = values.unflatten(-1, (values.shape[-1] // 8, 8)).to(word)
    shifts = torch.arange(0, 8 * bits, bits, device=values.device, dtype=word)
    words = (groups << shifts).sum(-1, keepdim=True, dtype=word)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=values.device, dtype=word)
    packed = (words >> byte_shifts) & 0xFF
    return packed.flatten(-2).to(torch.uint8)


_FOLD_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # codes per byte → a word of that many bytes


def _word_dtype(bits: int) -> torch.dtype:
    """The integer type that holds eight b-bit values."""
    return torch.int32 if 8 * bits < 32 else torch.int64


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n values of each row, as `dtype` (int32: the indices that
    `index_select` takes, without an int64 copy of every code)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range 1..8 for unpack_bits")
    expected = packed_row_bytes(n, bits)
    if packed.dtype != torch.uint8 or packed.shape[-1] != expected:
        raise ValueError(
            f"packed codes have dtype {packed.dtype} and rows of {packed.shape[-1]} bytes; "
            f"{n} values at {bits} bits need uint8 rows of {expected} bytes"
        )
    if bits == 8:
        return packed[..., :n].to(dtype)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return values.flatten(-2)[..., :n].to(dtype)
    word = _word_dtype(bits)
    groups = packed.unflatten(-1, (packed.shape[-1] // bits, bits)).to(word)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=packed.device, dtype=word)
    words = (groups << byte_shifts).sum(-1, keepdim=True, dtype=word)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=word)
    values = (words >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :n].to(dtype)


def field_layout(widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For fields of `widths` bits laid end to end (little-endian, field i first), each bit position's
    field and the bit's place within it: what `pack_fields` and `unpack_fields` share."""
    widths = widths.long()
    field = torch.repeat_interleave(torch.arange(len(widths), device=widths.device), widths)
    starts = torch.cumsum(widths, 0) - widths
    return field, torch.arange(len(field), device=widths.device) - starts[field]


def pack_fields(values: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pack values[..., i] in [0, 2^widths[i]) (a width may be 0: nothing stored) into one bit stream per
    row, ceil(Σ widths / 8) bytes: unequal widths with no padding between fields."""
    field, place = field_layout(widths)
    bits = (values[..., field].to(torch.int64) >> place) & 1
    bits = torch.nn.functional.pad(bits, (0, -bits.shape[-1] % 8))
    bits = bits.unflatten(-1, (bits.shape[-1] // 8, 8))
    return (bits << torch.arange(8, device=bits.device)).sum(-1).to(torch.uint8)


def unpack_fields(packed: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fields`: [..., len(widths)] int64 (0 where a field has no bits)."""
    field, place = field_layout(widths)
    expected = -(-len(field) // 8)
    if packed.dtype != torch.uint8 or packed.shape[-1] != expected:
        raise ValueError(
            f"packed codes have dtype {packed.dtype} and rows of {packed.shape[-1]} bytes; "
            f"fields of {len(field)} bits need uint8 rows of {expected} bytes"
        )
    positions = torch.arange(len(field), device=packed.device)
    bits = (packed[..., positions // 8].to(torch.int64) >> (positions % 8)) & 1
    out = torch.zeros(*packed.shape[:-1], len(widths), dtype=torch.int64, device=packed.device)
    return out.index_add_(-1, field, bits << place)
