"""Attention blocks with protected (sink) tokens: exact where kept, coded elsewhere, every byte counted."""

import torch

from tqlab.evaluate.module import compress_block
from tqlab.kv import KVQuantSpec
from tqlab.kv.builder import CodecBank


def test_sink_tokens_stay_exact_and_are_counted_at_16_bits():
    g = torch.Generator().manual_seed(0)
    item = {
        "q": torch.randn(2, 40, 64, generator=g),
        "k": torch.randn(40, 64, generator=g) * 3,
        "v": torch.randn(40, 64, generator=g),
        "layer": 0,
        "kv_head": 0,
        "scaling": 0.125,
    }
    bank = CodecBank(KVQuantSpec.create("turboquant_mse", 2, "fast_hadamard"), 64)
    out = compress_block(bank, item, "cpu", sink_tokens=4)
    torch.testing.assert_close(out["approx"][..., :4], out["exact"][..., :4])
    assert (out["approx"][..., 4:] - out["exact"][..., 4:]).abs().min() > 0
    torch.testing.assert_close(out["v_hat"][:4], item["v"][:4])
    codec = bank.get("key", 0, 0, "cpu")
    # the coded part is exactly what the codec makes of the tokens after the sinks
    expected = codec.score(item["q"], codec.quantize(item["k"][4:])).double() * 0.125
    torch.testing.assert_close(out["approx"][..., 4:], expected)
    assert out["key_bytes"] == out["value_bytes"] == 4 * 64 * 2 + 36 * (64 * 2 // 8 + 2)
    none = compress_block(bank, item, "cpu", sink_tokens=0)
    assert none["key_bytes"] == 40 * (64 * 2 // 8 + 2)
