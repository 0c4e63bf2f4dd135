"""The registry, the spec and the one builder: same rules everywhere, labels that say what was built."""

import subprocess
import sys

import pytest
import torch

from tqlab import config, quant, registry, rotation
from tqlab.kv import KVQuantSpec, RuleError
from tqlab.kv.builder import CodecBank, unit_seed
from tqlab.quant import QueryWeighted
from tqlab.rotation.io import load_rotations, save_rotations


def test_config_and_library_read_one_registry():
    assert config.ConfigError is registry.RuleError
    assert set(rotation.ROTATIONS) == set(registry.ROTATIONS)  # every registered name has a class
    assert quant.CODECS == tuple(registry.CODECS)
    assert rotation.VIEWS is registry.VIEWS
    # the library refuses exactly what the spec refuses, over a grid of codecs and widths
    for codec in registry.CODECS:
        for bits in (1, 2, 2.5, 2.3, 3, 4, 8, 9):
            rot = "identity" if registry.CODECS[codec].rotations else "random_haar"
            try:
                KVQuantSpec.create(codec, bits, rot, compress=registry.CODECS[codec].sides, head_dim=64)
                spec_ok = True
            except RuleError:
                spec_ok = False
            try:
                quant.make_codec(codec, 64, bits)
                library_ok = True
            except ValueError:
                library_ok = False
            assert spec_ok == library_ok, (codec, bits)


def test_the_spec_imports_no_torch():
    code = "import sys; from tqlab.kv import KVQuantSpec; KVQuantSpec.create(bits=3); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_unit_seeds_differ_for_every_side_layer_and_head():
    seeds = {unit_seed(0, s, layer, h) for s in registry.SIDES for layer in range(40) for h in range(16)}
    assert len(seeds) == 2 * 40 * 16


def test_builder_gives_each_unit_its_own_rotation_reproducibly():
    spec = KVQuantSpec.create("turboquant_mse", 3, "random_haar", seed=5)
    a, b = CodecBank(spec, 32), CodecBank(spec, 32)
    m = {u: a.get(*u, "cpu").rotation.matrix() for u in [("key", 0, 0), ("key", 0, 1), ("value", 0, 0)]}
    assert not torch.equal(m[("key", 0, 0)], m[("key", 0, 1)]) and not torch.equal(
        m[("key", 0, 0)], m[("value", 0, 0)]
    )
    torch.testing.assert_close(b.get("key", 0, 1, "cpu").rotation.matrix(), m[("key", 0, 1)], rtol=0, atol=0)
    other = CodecBank(KVQuantSpec.create("turboquant_mse", 3, "random_haar", seed=6), 32)
    assert not torch.equal(other.get("key", 0, 1, "cpu").rotation.matrix(), m[("key", 0, 1)])


def test_kivi_quantizes_keys_per_channel_and_values_per_token():
    bank = CodecBank(KVQuantSpec.create("kivi", 2, "identity"), 32)
    assert bank.get("key", 0, 0, "cpu").axis == "channel" and bank.get("value", 0, 0, "cpu").axis == "token"


def test_fitted_rotations_are_the_ones_built_and_labelled(tmp_path):
    fitted = {f"key_layer{i}": rotation.make_rotation("block_so8_learned", 16, seed=i) for i in range(2)}
    facts = {
        "rotation": "block_so8_learned",
        "rotation_options": {"view": "vector", "init": "random"},
        "dim": 16,
        "codec": "turboquant_mse",
        "bits": {"key": 2, "value": None},
        "model": "m",
        "layers": [0, 1],
    }
    save_rotations(tmp_path / "best.safetensors", fitted, facts)
    spec = KVQuantSpec.create(
        bits=2, compress=("key", "value"), fitted=tmp_path / "best.safetensors", model="m"
    )
    assert (
        spec.columns()["k_rotation"] == "fitted:block_so8_learned"
        and spec.columns()["v_rotation"] == "random_haar"
    )
    bank = CodecBank(spec, 16)
    for layer in range(2):
        torch.testing.assert_close(
            bank.get("key", layer, 1, "cpu").rotation.matrix(), fitted[f"key_layer{layer}"].matrix()
        )
    with pytest.raises(RuleError, match=r"has no key rotation for \(layer, head\) \[\(2, 0\)"):
        bank.check_units([0, 1, 2], 1)
    with pytest.raises(RuleError, match="fitted on model m; this run has model other"):
        KVQuantSpec.create(bits=2, fitted=tmp_path / "best.safetensors", model="other")
    with pytest.raises(RuleError, match="fitted for head_dim 16, this model has 32"):
        CodecBank(spec, 32)


def test_rotation_artefacts_round_trip_through_safetensors(tmp_path):
    rots = {
        "key_layer0_head1": rotation.make_rotation(
            "fast_hadamard+block_so8_learned", 32, seed=3, view="spinor_minus"
        )
    }
    save_rotations(
        tmp_path / "r.safetensors",
        rots,
        {
            "rotation": "fast_hadamard+block_so8_learned",
            "rotation_options": {"view": "spinor_minus"},
            "dim": 32,
        },
    )
    back, facts = load_rotations(tmp_path / "r.safetensors")
    assert facts["units"] == ["key_layer0_head1"]
    torch.testing.assert_close(
        back["key_layer0_head1"].matrix(), rots["key_layer0_head1"].matrix(), rtol=0, atol=0
    )


def test_constant_bytes_are_the_codecs_buffers_counted_by_hand():
    spec = KVQuantSpec.create("turboquant_mse", 2, "random_haar", compress=("key",))
    bank = CodecBank(spec, 16)
    units = [(0, 0), (0, 1), (1, 0)]
    by_hand = 0
    for layer, head in units:
        codec = bank.get("key", layer, head, "cpu")
        by_hand += sum(b.numel() * b.element_size() for b in codec.buffers())
    assert bank.constant_nbytes(units, "cpu") == by_hand


def test_fractional_bits_check_each_channel_groups_rotation_before_compute():
    # 2.25 bits at head_dim 128: 32 outlier channels and 96 others, each rotated alone; 96 is no power of two
    with pytest.raises(RuleError, match="needs a power-of-two head_dim >= 4; this model has 96"):
        KVQuantSpec.create("turboquant_mse", 2.25, "fast_hadamard", head_dim=128)
    KVQuantSpec.create("turboquant_mse", 2.5, "fast_hadamard", head_dim=128)  # 64 + 64: fine


@pytest.mark.parametrize(
    "codec,bits,rotation,options",
    [
        ("turboquant_mse", 2.5, "random_haar", {}),
        ("turboquant_mse", 3, "random_haar", {"center": True}),
        ("turboquant_mse", 3, "random_haar", {"key_metric": "query"}),
        ("turboquant_mse", 3, "eigen_hadamard", {}),
        ("transform_coding", 2, "identity", {}),
    ],
)
def test_per_head_statistics_without_calibration_data_are_refused_clearly(codec, bits, rotation, options):
    with pytest.raises(RuleError, match="fit per-head statistics on calibration vectors"):
        CodecBank(KVQuantSpec.create(codec, bits, rotation, codec_options=options), 64)


def test_centering_and_the_query_metric_are_built_from_train_statistics_and_counted():
    g = torch.Generator().manual_seed(0)
    data = {side: torch.randn(300, 64, generator=g) + i for i, side in enumerate(("key", "value", "query"))}
    spec = KVQuantSpec.create(
        "turboquant_mse", 3, "fast_hadamard", codec_options={"center": True, "key_metric": "query"}
    )
    bank = CodecBank(spec, 64, lambda side, layer, head: data[side])
    key, value = bank.get("key", 0, 0, "cpu"), bank.get("value", 0, 0, "cpu")
    torch.testing.assert_close(key.mean, data["key"].mean(0))
    torch.testing.assert_close(value.mean, data["value"].mean(0))
    assert isinstance(key.inner, QueryWeighted) and not isinstance(value.inner, QueryWeighted)  # keys only
    plain = CodecBank(KVQuantSpec.create("turboquant_mse", 3, "fast_hadamard"), 64).get("key", 0, 0, "cpu")
    assert key.constant_nbytes() == plain.constant_nbytes() + 64 * 4 + 2 * 64 * 64 * 4  # mean + two maps


def test_data_aware_codecs_and_rotations_are_fitted_on_what_the_codec_sees():
    g = torch.Generator().manual_seed(0)
    spread = torch.linspace(4, 0.1, 64)
    data = {side: torch.randn(2000, 64, generator=g) * spread + 3 for side in ("key", "value", "query")}
    calibration = lambda side, layer, head: data[side]  # noqa: E731
    options = {"center": True, "key_metric": "query", "scale": "none"}  # "norm" would fit on rescaled vectors
    coder = CodecBank(
        KVQuantSpec.create("transform_coding", 2, "identity", codec_options=options), 64, calibration
    )
    key = coder.get("key", 0, 0, "cpu")  # Centered(QueryWeighted(TransformCoder))
    inner, seen = key.inner.inner, (data["key"] - data["key"].mean(0)) @ key.inner.key_map
    assert isinstance(inner, quant.TransformCoder) and inner.widths.sum() == 128
    torch.testing.assert_close(
        inner.std[0] ** 2, torch.linalg.eigvalsh(seen.T @ seen / len(seen))[-1], rtol=0.05, atol=0
    )
    x = data["key"][:50]
    torch.testing.assert_close(
        key.score(data["query"][:3], key.quantize(x)),
        data["query"][:3] @ key.dequantize(key.quantize(x)).T,
        rtol=1e-3,
        atol=1e-3,
    )
    eigen = CodecBank(KVQuantSpec.create("turboquant_mse", 2, "eigen_hadamard"), 64, calibration)
    rot = eigen.get("value", 0, 0, "cpu").rotation
    top = torch.linalg.eigh(data["value"].T @ data["value"] / 2000).eigenvectors[:, -1]
    assert abs(torch.dot(rot.eigenvectors[:, 0], top)) > 0.99
    query_basis = CodecBank(
        KVQuantSpec.create("turboquant_mse", 2, "eigen_hadamard", rotation_options={"basis": "query"}),
        64,
        calibration,
    )
    rot = query_basis.get("key", 0, 0, "cpu").rotation
    top = torch.linalg.eigh(data["query"].T @ data["query"] / 2000).eigenvectors[:, -1]
    assert abs(torch.dot(rot.eigenvectors[:, 0], top)) > 0.99


def test_asymmetric_lanes_build_each_sides_own_codec_and_name_both():
    spec = KVQuantSpec.create(
        "turboquant_mse", 3, "fast_hadamard", k_codec="int8_block", k_bits=8, head_dim=64
    )
    bank = CodecBank(spec, 64)
    key, value = bank.get("key", 0, 0, "cpu"), bank.get("value", 0, 0, "cpu")
    assert isinstance(key, quant.Int8Block) and isinstance(value, quant.TurboQuantMSE)
    assert value.bits == 3 and value.rotation.__class__.__name__ == "FastHadamard"
    columns = spec.columns()
    assert columns["codec"] == "K int8_block, V turboquant_mse"
    assert (columns["k_bits"], columns["v_bits"]) == (8, 3)
    assert (columns["k_rotation"], columns["v_rotation"]) == ("identity", "fast_hadamard")
    # the same codec named per side is not asymmetric: the spec is the plain one
    plain = KVQuantSpec.create("turboquant_mse", 3, "fast_hadamard", head_dim=64)
    assert (
        KVQuantSpec.create("turboquant_mse", 3, "fast_hadamard", v_codec="turboquant_mse", head_dim=64)
        == plain
    )


def test_runs_that_differ_in_one_sides_options_never_share_a_label():
    """The report pools rows of equal labels as one configuration's seeds: each side's codec and rotation
    options are in the label where the sides differ (here the eigenbasis under a Prod value codec)."""
    labels = [
        KVQuantSpec.create(
            "turboquant_mse", 3, "eigen_hadamard", compress=("key", "value"), v_codec="turboquant_prod",
            rotation_options={"basis": basis}, head_dim=64,
        ).columns()
        for basis in ("key", "query")
    ]  # fmt: skip
    assert labels[0]["options"] != labels[1]["options"]
    assert '"basis": "query"' in labels[1]["options"]
    # sides that agree keep one set, as before
    same = KVQuantSpec.create("turboquant_mse", 3, "random_haar", compress=("key", "value"), head_dim=64)
    assert (
        same.columns()["options"]
        == KVQuantSpec.create("turboquant_mse", 3, "random_haar").columns()["options"]
    )


def test_a_rotation_or_option_that_no_side_would_use_is_refused():
    with pytest.raises(RuleError, match="rotation=fast_hadamard .* is used by no compressed side"):
        KVQuantSpec.create(
            "turboquant_mse",
            8,
            "fast_hadamard",
            compress=("key",),
            k_codec="int8_block",
            k_bits=8,
            head_dim=64,
        )
    # the configs' default rotation is not one the user asked for
    KVQuantSpec.create(
        "turboquant_mse", 8, "random_haar", compress=("key",), k_codec="int8_block", k_bits=8, head_dim=64
    )
    with pytest.raises(RuleError, match="codec.high_bits=2 must exceed bits=3"):
        KVQuantSpec.create("relevance_gated", 3, "random_haar", codec_options={"high_bits": 2})


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(k_codec="int8_block"), r"k_codec=int8_block does not take bits=3; set k_bits: \[8\]"),
        (dict(v_codec="zip", v_bits=2), "v_codec='zip' is not a codec; choose from"),
        (dict(v_codec="kivi", compress=("key",)), r"v_codec=kivi is set but kv.compress=\['key'\]"),
    ],
)
def test_asymmetric_lanes_refuse_what_cannot_be_built(options, message):
    with pytest.raises(RuleError, match=message):
        KVQuantSpec.create("turboquant_mse", 3, "fast_hadamard", head_dim=64, **options)


def test_head_dim_and_seed_of_the_wrong_kind_are_refused_by_the_python_api():
    for head_dim in ("64", 0, -64, 64.0, True):
        with pytest.raises(RuleError, match=f"head_dim={head_dim!r} must be an integer >= 8"):
            KVQuantSpec.create("turboquant_mse", 3, "random_haar", head_dim=head_dim)
    for seed in (-7, 2**40):
        with pytest.raises(RuleError, match=f"seed={seed} must be an integer in 0..2\\^32 − 1"):
            KVQuantSpec.create("turboquant_mse", 3, "random_haar", seed=seed)


def test_fits_differing_in_a_setting_are_other_configurations_and_in_their_seed_the_same(tmp_path):
    from tqlab.kv.spec import FittedRotations
    from tqlab.rotation import make_rotation
    from tqlab.rotation.io import save_rotations

    def fitted(name, **config):
        path = tmp_path / f"{name}.safetensors"
        facts = {
            "rotation": "block_so8_learned",
            "dim": 16,
            "config": {"task": "train", "fit": {"lr": 0.01}, "seed": 0, **config},
        }
        save_rotations(path, {"key_layer0": make_rotation("block_so8_learned", 16)}, facts)
        return FittedRotations.read(path)

    base = fitted("base")
    assert fitted("seed1", seed=1).config_hash == base.config_hash  # one configuration, another seed
    assert fitted("logged", logger="csv", results_root="/elsewhere").config_hash == base.config_hash
    assert fitted("stored", store={"root": "/captures"}).config_hash == fitted("s2", store={}).config_hash
    assert fitted("lr", fit={"lr": 0.2}).config_hash != base.config_hash


def test_kivi_key_groups_run_along_tokens_and_value_groups_along_channels():
    keys = KVQuantSpec.create(
        "kivi", 2, "identity", compress=("key",), codec_options={"group": 128}, head_dim=64
    )
    assert isinstance(CodecBank(keys, 64).get("key", 0, 0, "cpu"), quant.KIVI)  # 128 tokens per group: fine
    with pytest.raises(RuleError, match="codec.group=128 must divide head_dim 64"):
        KVQuantSpec.create(
            "kivi", 2, "identity", compress=("value",), codec_options={"group": 128}, head_dim=64
        )
