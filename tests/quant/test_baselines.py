"""Baselines against scalar loops written from their definitions (llama.cpp q8_0 / q4_0, KIVI)."""

import numpy as np
import pytest
import torch

from tqlab.quant import KIVI, Int4Block, Int8Block, make_codec


def loop_q8_0(x):
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            blk = x[r, b : b + 32]
            d = np.float16(np.abs(blk).max() / 127)
            q = np.clip(np.round(blk / d), -127, 127) if d else np.zeros(32)
            out[r, b : b + 32] = q * np.float32(d)
    return out


def loop_q4_0(x):
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            blk = x[r, b : b + 32]
            mx = blk[np.argmax(np.abs(blk))]
            d = np.float32(np.float16(mx / -8))
            q = [min(15, max(0, int(np.floor(v / d + 8.5)))) for v in blk]
            out[r, b : b + 32] = (np.array(q) - 8) * d
    return out


def loop_kivi(rows, bits):  # asymmetric per row of 32
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        lo = np.float32(np.float16(rows[r].min()))
        s = np.float32(np.float16((rows[r].max() - lo) / (2**bits - 1)))
        out[r] = np.clip(np.round((rows[r] - lo) / s), 0, 2**bits - 1) * s + lo
    return out


def data(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_int8_block_matches_q8_0_loop():
    x = data(20, 64)
    codec = Int8Block(64)
    code = codec.quantize(x)
    np.testing.assert_allclose(codec.dequantize(code).numpy(), loop_q8_0(x.numpy()), rtol=1e-6, atol=1e-6)
    assert code.bits_per_coordinate == 8.5


def test_int4_block_matches_q4_0_loop():
    x = data(20, 64)
    codec = Int4Block(64)
    code = codec.quantize(x)
    np.testing.assert_allclose(codec.dequantize(code).numpy(), loop_q4_0(x.numpy()), rtol=1e-5, atol=1e-5)
    assert code.bits_per_coordinate == 4.5


def test_hadamard_int4_helps_on_outlier_channels():
    x = data(500, 128)
    x[:, 3] *= 30
    plain, rotated = Int4Block(128), Int4Block(128, rotation="fast_hadamard")

    def err(c):
        return ((c.dequantize(c.quantize(x)) - x) ** 2).sum()

    assert err(rotated) < err(plain)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_values_are_quantized_per_token_groups(bits):
    x = data(10, 64)
    codec = KIVI(64, bits=bits, axis="token")
    expected = loop_kivi(x.numpy().reshape(-1, 32), bits).reshape(10, 64)
    np.testing.assert_allclose(codec.dequantize(codec.quantize(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_kivi_keys_are_quantized_per_channel_over_token_groups_with_padding_counted():
    x = data(2, 40, 64)  # 40 tokens: padded to 64 by repeating the last token
    codec = KIVI(64, bits=2, axis="channel")
    code = codec.quantize(x)
    padded = torch.cat([x, x[:, -1:].expand(2, 24, 64)], dim=1)
    rows = padded.transpose(1, 2).reshape(-1, 32).numpy()  # [batch, channel, token-group]
    expected = torch.from_numpy(loop_kivi(rows, 2)).reshape(2, 64, 64).transpose(1, 2)[:, :40]
    torch.testing.assert_close(codec.dequantize(code), expected, rtol=1e-5, atol=1e-5)
    # payload 2 bits + fp16 scale and zero per 32 tokens, over 64 stored tokens for 40 real ones
    assert code.bits_per_coordinate == pytest.approx((2 + 32 / 32) * 64 / 40)


@pytest.mark.parametrize("tokens", [12, 28])
def test_kivi_keys_in_groups_of_4_tokens_decode_when_their_bits_fill_no_whole_byte(tokens):
    """3 or 7 groups of 4 two-bit codes per channel pack into bytes holding up to 8 values of padding."""
    x = data(2, tokens, 64)
    codec = KIVI(64, bits=2, axis="channel", group=4)
    rows = x.transpose(1, 2).reshape(-1, 4).numpy()
    expected = torch.from_numpy(loop_kivi(rows, 2)).reshape(2, 64, tokens).transpose(1, 2)
    torch.testing.assert_close(codec.dequantize(codec.quantize(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make", [lambda b: Int8Block(64, block=b), lambda b: KIVI(64, axis="channel", group=b)]
)
def test_block_sizes_must_be_positive_integers(make):
    for block in (0, -32, 32.0, True):
        with pytest.raises(ValueError, match=f"the block size {block!r} must be a positive integer"):
            make(block)


def test_baselines_refuse_bits_they_do_not_have():
    with pytest.raises(ValueError, match=r"bits=3 is not allowed for codec=int4_block: choose from \[4\]"):
        make_codec("int4_block", 64, 3)
    with pytest.raises(ValueError, match="choose 2 or 4"):
        KIVI(64, bits=3)
    with pytest.raises(ValueError, match="'nf4' is not a codec"):
        make_codec("nf4", 64, 4)


@pytest.mark.parametrize(
    "codec,largest",
    [(Int8Block(64), 127 * 65504), (Int4Block(64), 8 * 65504), (KIVI(64, bits=2, axis="token"), 65504)],
)
def test_baselines_store_inputs_up_to_their_fp16_scale_limit_and_refuse_beyond(codec, largest):
    x = torch.randn(64, 64)
    fits = x / x.abs().max() * largest * 0.99
    decoded = codec.dequantize(codec.quantize(fits))
    assert torch.isfinite(decoded).all()
    assert ((decoded - fits).norm() / fits.norm()).item() < 0.5
    with pytest.raises(ValueError, match="overflows its fp16 storage"):
        codec.quantize(fits * 2)
