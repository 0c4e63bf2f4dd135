"""Protected channels: tiers chosen by brute-force sensitivity, exact channels exact, the residual captured,
bytes counted by hand, the attention weights against a loop, and the codec inside the cache."""

import pytest
import torch

from tqlab.cache import compress_kv
from tqlab.kv import KVQuantSpec, RuleError
from tqlab.kv.builder import CodecBank
from tqlab.quant import ProtectedChannels, TurboQuantMSE
from tqlab.tasks.common import attention_weights


def planted(n=2000, dim=64, seed=0):
    """Vectors whose group 2 is loud on the first half of the tokens and group 5 moderately loud on the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x[: n // 2, 16:24] *= 6
    x[n // 2 :, 40:48] *= 4
    return x


def test_tiers_follow_the_weighted_group_energy_brute_force():
    x = planted()
    weights = torch.cat([torch.full((1000,), 0.01), torch.ones(1000)])  # the first half hardly attended
    for w, exact_group in ((None, 2), (weights, 5)):
        codec = ProtectedChannels(64, 2, exact_groups=1, high_groups=2)
        scores = codec.calibrate(x, w)
        ww = torch.ones(len(x)) if w is None else w
        brute = torch.tensor(
            [sum(ww[t] * x[t, 8 * g : 8 * g + 8].pow(2).sum() for t in range(len(x))) for g in range(8)]
        )
        torch.testing.assert_close(scores.float(), brute, rtol=1e-4, atol=0)
        order = brute.argsort(descending=True)
        assert codec.exact_channels.tolist() == list(range(8 * exact_group, 8 * exact_group + 8))
        assert set(codec.high_channels.tolist()) == {8 * int(g) + i for g in order[1:3] for i in range(8)}
        assert sorted(
            codec.exact_channels.tolist() + codec.high_channels.tolist() + codec.base_channels.tolist()
        ) == list(range(64))


def test_exact_channels_are_exact_and_protection_beats_plain_codes_on_held_out_vectors():
    train, test = planted(seed=0), planted(seed=1)
    codec = ProtectedChannels(64, 2, exact_groups=1, high_groups=1, high_bits=4)
    codec.calibrate(train)
    decoded = codec.dequantize(codec.quantize(test))
    exact = codec.exact_channels
    torch.testing.assert_close(decoded[:, exact], test[:, exact].half().float(), rtol=0, atol=0)
    plain = TurboQuantMSE(64, 3, rotation="random_haar", seed=0)  # more payload bits than the base tier
    err = (decoded - test).pow(2).sum() / test.pow(2).sum()
    err_plain = (plain.dequantize(plain.quantize(test)) - test).pow(2).sum() / test.pow(2).sum()
    assert err < err_plain


def test_the_residual_coefficients_hold_the_projection_of_what_the_tiers_missed():
    train, test = planted(seed=0), planted(seed=1)
    errors = []
    for rank in (0, 4, 16):
        codec = ProtectedChannels(64, 1, exact_groups=0, high_groups=1, high_bits=2, rank=rank)
        codec.calibrate(train)
        code = codec.quantize(test)
        decoded = codec.dequantize(code)
        if rank:  # the basis is orthonormal and the decoded error has no component left along it (fp16)
            torch.testing.assert_close(codec.basis.T @ codec.basis, torch.eye(rank), atol=1e-5, rtol=0)
            assert ((decoded - test) @ codec.basis).abs().max() < 2e-3 * test.abs().max()
        errors.append(((decoded - test).pow(2).sum() / test.pow(2).sum()).item())
    assert errors[0] > errors[1] > errors[2]


def test_bytes_are_every_tier_counted_by_hand():
    dim, n = 64, 10
    codec = ProtectedChannels(dim, 2, exact_groups=1, high_groups=2, high_bits=4, rank=4)
    codec.calibrate(planted())
    code = codec.quantize(planted(n=n, seed=3))
    per_vector = 8 * 2 + (16 * 4 // 8 + 2) + (40 * 2 // 8 + 2) + 4 * 2  # exact fp16, high, base, residual
    assert code.nbytes == n * per_vector
    assert code.bits_per_coordinate == pytest.approx(8 * per_vector / dim)
    # constants: channel sets, residual basis, both codecs' codebooks and rotations
    assert (
        codec.constant_nbytes()
        == 64 * 8 + dim * 4 * 4 + codec.high_codec.constant_nbytes() + codec.base_codec.constant_nbytes()
    )


def test_attention_weights_against_a_loop():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(3, 7, 16, generator=g), torch.randn(7, 16, generator=g)
    want = torch.zeros(7, dtype=torch.float64)
    for head in range(3):
        for i in range(7):
            logits = torch.tensor([float(q[head, i] @ k[t]) / 4 for t in range(i + 1)], dtype=torch.float64)
            p = torch.softmax(logits, 0)
            for t in range(i + 1):
                want[t] += p[t] ** 2
    torch.testing.assert_close(attention_weights(q, k), want)


def test_the_builder_ranks_by_the_units_attention_weights_and_the_spec_checks_the_tiers():
    x = planted()
    weights = torch.cat([torch.full((1000,), 0.01), torch.ones(1000)])
    calibration = lambda side, layer, head: weights if side == "weights" else x  # noqa: E731
    for ranking, exact_group in (("attention", 5), ("energy", 2)):
        spec = KVQuantSpec.create(
            "protected_channels", 2, "identity", compress=("value",), head_dim=64,
            codec_options={"ranking": ranking, "high_groups": 2},
        )  # fmt: skip
        codec = CodecBank(spec, 64, calibration).get("value", 0, 0, "cpu")
        assert codec.exact_channels.tolist() == list(range(8 * exact_group, 8 * exact_group + 8))

    # every unit and every seed draws its own tier rotations
    def rotation_of(seed, layer):
        spec = KVQuantSpec.create(
            "protected_channels", 2, "identity", compress=("value",), head_dim=64, seed=seed
        )
        return CodecBank(spec, 64, calibration).get("value", layer, 0, "cpu").base_codec.rotation.matrix()

    assert not torch.equal(rotation_of(0, 0), rotation_of(1, 0))
    assert not torch.equal(rotation_of(0, 0), rotation_of(0, 1))
    assert torch.equal(rotation_of(0, 0), rotation_of(0, 0))
    with pytest.raises(RuleError, match="must leave one of head_dim 64's 8 groups"):
        KVQuantSpec.create(
            "protected_channels",
            2,
            "identity",
            head_dim=64,
            codec_options={"exact_groups": 4, "high_groups": 4},
        )
    with pytest.raises(RuleError, match="codec.high_bits=2 must exceed bits=2"):
        KVQuantSpec.create("protected_channels", 2, "identity", head_dim=64, codec_options={"high_bits": 2})


def test_protected_values_in_the_cache_are_the_bytes_their_codes_hold():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=32,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).float().eval()
    spec = KVQuantSpec.create("protected_channels", 2, "identity", compress=("value",), head_dim=32)
    calibration = lambda side, layer, head: torch.ones(200) if side == "weights" else torch.randn(200, 32)  # noqa: E731
    cache = compress_kv(model, spec, calibration)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, cache=cache)
    per_token = 8 * 2 + (8 * 4 // 8 + 2) + (16 * 2 // 8 + 2)  # exact group, high group, base: d = 32
    keys = 12 * 32 * 4  # keys exact, float32
    assert cache.nbytes()["stored"] == 2 * 2 * (12 * per_token + keys)
