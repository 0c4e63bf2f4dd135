"""Decode attention over TurboQuant-Prod codes against float64 attention over the codec's dequantized vectors.

Prod's score ⟨q, c[idx]⟩ + √(π/2)/d ‖r‖ ⟨S q, s⟩ is ⟨q, c[idx] + √(π/2)/d ‖r‖ Sᵀ s⟩: the inner product with the
codec's DeQuant_prod in the rotated domain, so one reference serves both sides."""

import pytest
import torch

pytest.importorskip("triton")

from test_decode import TOLERANCE, gaussian, reference, rotated_codes  # noqa: E402

from tqlab.kernels import centroid_table, decode_attention  # noqa: E402
from tqlab.kernels.decode import QJLSketch  # noqa: E402
from tqlab.quant import TurboQuantMSE, TurboQuantProd, unpack_bits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rotated_prod(codec: TurboQuantProd, code) -> torch.Tensor:
    """‖x‖ (c[idx] + √(π/2)/d ‖r‖ Sᵀ s) in float64 from the stored bytes; per KV head h, codec[h]."""
    idx = unpack_bits(code.indices, codec.bits - 1, codec.dim)
    signs = unpack_bits(code.signs, 1, codec.dim).double() * 2 - 1
    gamma = codec.qjl_scale * code.residual_norms.double().unsqueeze(-1)
    y = codec.mse.centroids.double()[idx] + gamma * (signs @ codec.projection.double())
    return y * code.norms.double().unsqueeze(-1)


def per_head(codecs, x):
    """Each KV head's codes by its own codec, stacked on the head axis (as the cache stores them)."""
    return [c.quantize(x[:, h]) for h, c in enumerate(codecs)]


def stacked(codes, field):
    return torch.stack([getattr(c, field) for c in codes], 1).to(DEVICE)


def sketch(codecs, codes):
    return QJLSketch(
        stacked(codes, "signs"), stacked(codes, "residual_norms"),
        torch.stack([c.projection for c in codecs]).to(DEVICE), codecs[0].qjl_scale,
    )  # fmt: skip


CASES = [  # dim, key codec, value codec (bits; "p" Prod, "m" MSE), group, query tokens, lengths, splits
    (64, "p3", "p3", 4, 1, [150, 77], 3),
    (128, "p4", "m3", 8, 1, [97, 200], 2),
    (128, "m4", "p5", 2, 3, [70, 64], 2),
    (128, "p5", "p4", 1, 2, [129], None),
    (256, "p3", "p4", 4, 1, [90, 130], 2),
    (32, "p3", "p3", 2, 1, [40], 1),  # one sign word per row; one chunk: no merge
]


@pytest.mark.parametrize("dim,k_spec,v_spec,group,q_len,lengths,splits", CASES)
def test_prod_codes_match_float64_attention_over_the_dequantized_codes(
    dim, k_spec, v_spec, group, q_len, lengths, splits
):
    batch, kv_heads, tokens = len(lengths), 2, max(lengths)
    seed = dim + group + int(k_spec[1]) * 10 + int(v_spec[1])
    sides = {}
    for side, spec, scale in (("key", k_spec, 2.0), ("value", v_spec, 3.0)):
        kind, bits = spec[0], int(spec[1])
        make = TurboQuantProd if kind == "p" else TurboQuantMSE
        codecs = [
            make(dim, bits, rotation="fast_hadamard", seed=seed + 7 * h + len(side)) for h in range(kv_heads)
        ]
        codes = per_head(codecs, gaussian(batch, kv_heads, tokens, dim, seed=seed + len(side)) * scale)
        if kind == "p":
            decoded = torch.stack([rotated_prod(c, code) for c, code in zip(codecs, codes, strict=True)], 1)
            # the reference's dequantized vectors are the codec's own (rotated back: DeQuant_prod)
            own = codecs[0].rotation.apply(codecs[0].dequantize(codes[0]).double())
            torch.testing.assert_close(decoded[:, 0], own, rtol=0, atol=1e-4 * own.abs().max())
            stage1, extra = codecs[0].mse, sketch(codecs, codes)
        else:
            decoded = torch.stack([rotated_codes(c, code) for c, code in zip(codecs, codes, strict=True)], 1)
            stage1, extra = codecs[0], None
        table = centroid_table(stage1.centroids.to(DEVICE))
        sides[side] = (stacked(codes, "indices"), stacked(codes, "norms"), table, extra, decoded)
    q = gaussian(batch, kv_heads * group, q_len, dim, seed=seed + 2) * 2  # already rotated
    lengths = torch.tensor(lengths)
    scaling = dim**-0.5
    (k_idx, k_norms, k_table, k_sketch, keys), (v_idx, v_norms, v_table, v_sketch, values) = sides.values()
    out, lse = decode_attention(
        q.to(DEVICE), k_idx, k_norms, v_idx, v_norms, k_table, v_table, lengths.to(DEVICE), scaling, splits,
        key_sketch=k_sketch, value_sketch=v_sketch,
    )  # fmt: skip
    expected, expected_lse = reference(q, keys, values, lengths, scaling, with_lse=True)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=TOLERANCE * expected.abs().max())
    torch.testing.assert_close(lse.cpu().double(), expected_lse, rtol=TOLERANCE, atol=0)


def test_prod_keys_with_padding_and_a_causal_shift():
    dim, batch, kv_heads, group, q_len, tokens = 64, 3, 2, 2, 2, 140
    codecs = [TurboQuantProd(dim, 4, rotation="fast_hadamard", seed=h) for h in range(kv_heads)]
    values = TurboQuantMSE(dim, 3, rotation="fast_hadamard", seed=9)
    k_codes = per_head(codecs, gaussian(batch, kv_heads, tokens, dim, seed=1) * 2)
    v_code = values.quantize(gaussian(batch, kv_heads, tokens, dim, seed=2))
    q = gaussian(batch, kv_heads * group, q_len, dim, seed=3) * 2
    lengths, starts, shift = torch.tensor([140, 90, 7]), torch.tensor([0, 30, 7]), 3  # the last sees nothing
    scaling = dim**-0.5
    out, lse = decode_attention(
        q.to(DEVICE), stacked(k_codes, "indices"), stacked(k_codes, "norms"), v_code.indices.to(DEVICE),
        v_code.norms.to(DEVICE), centroid_table(codecs[0].mse.centroids.to(DEVICE)),
        centroid_table(values.centroids.to(DEVICE)), lengths.to(DEVICE), scaling, 3,
        starts=starts.to(DEVICE), causal_shift=shift, key_sketch=sketch(codecs, k_codes),
    )  # fmt: skip
    keys = torch.stack([rotated_prod(c, code) for c, code in zip(codecs, k_codes, strict=True)], 1)
    expected, expected_lse = reference(
        q, keys, rotated_codes(values, v_code), lengths, scaling, starts, shift, with_lse=True
    )
    out = out.cpu().double()
    torch.testing.assert_close(out, expected, rtol=0, atol=TOLERANCE * expected.abs().max())
    assert (out[2] == 0).all() and not lse[2].isfinite().any()


def test_a_sketch_of_the_wrong_shape_is_refused():
    dim, batch, kv_heads, tokens = 64, 1, 2, 10
    codecs = [TurboQuantProd(dim, 3, seed=h) for h in range(kv_heads)]
    codes = per_head(codecs, gaussian(batch, kv_heads, tokens, dim, seed=0))
    good = sketch(codecs, codes)
    table = centroid_table(codecs[0].mse.centroids.to(DEVICE))
    args = (
        gaussian(batch, 2, 1, dim, seed=1).to(DEVICE), stacked(codes, "indices"), stacked(codes, "norms"),
        stacked(codes, "indices"), stacked(codes, "norms"), table, table, torch.tensor([tokens]).to(DEVICE), 0.1,
    )  # fmt: skip
    short = QJLSketch(good.signs[:, :, :5], good.residual_norms, good.projection, good.scale)
    with pytest.raises(ValueError, match=r"key_sketch.signs has shape \(1, 2, 5, 8\)"):
        decode_attention(*args, key_sketch=short)
    integer_norms = QJLSketch(good.signs, good.residual_norms.to(torch.int16), good.projection, good.scale)
    with pytest.raises(ValueError, match="residual_norms must be floating"):
        decode_attention(*args, key_sketch=integer_norms)
    one_head = QJLSketch(good.signs, good.residual_norms, good.projection[:1], good.scale)
    with pytest.raises(ValueError, match=r"value_sketch.projection has shape \(1, 64, 64\)"):
        decode_attention(*args, value_sketch=one_head)
