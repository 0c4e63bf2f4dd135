"""What the codecs refuse rather than store wrongly: side information their storage dtype cannot hold,
rescalings that would bias Prod's scores, fits on no data, rotation files that do not rebuild rotations."""

import json

import pytest
import torch

from tqlab.quant import (
    KIVI,
    Int4Block,
    Int8Block,
    ProtectedChannels,
    TransformCoder,
    TurboQuantMSE,
    TurboQuantProd,
)
from tqlab.rotation import make_rotation
from tqlab.rotation.eigen import EigenHadamard
from tqlab.rotation.io import load_rotations, save_rotations


@pytest.mark.parametrize("option", ["norm_correction", "unbiased"])
def test_prod_refuses_a_rescaled_first_stage(option):
    with pytest.raises(ValueError, match=f"TurboQuantProd takes no \\['{option}'\\]"):
        TurboQuantProd(64, 3, rotation="fast_hadamard", **{option: True})


def test_side_information_that_underflows_its_storage_is_refused():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    tiny = x * 1e-7  # norms ≈ 8e-7: an fp16 subnormal keeps 3–4 significant bits of them
    with pytest.raises(ValueError, match="a vector norm .* underflows its torch.float16 storage"):
        TurboQuantMSE(64, 4, rotation="fast_hadamard").quantize(tiny)
    codec = TurboQuantMSE(64, 4, rotation="fast_hadamard", norm_dtype=torch.float32)  # what the error advises
    decoded = codec.dequantize(codec.quantize(tiny))
    assert ((decoded - tiny).norm() / tiny.norm()).item() < 0.15  # 4-bit error, not a lost scale
    for block_codec in (Int8Block(64), Int4Block(64)):
        with pytest.raises(ValueError, match="a block's scale .* underflows"):
            block_codec.quantize(x * 1e-6)
    codec.quantize(torch.zeros(2, 64))  # a zero vector is stored exactly: nothing lost
    # KIVI's scale spans only a group's range above its zero point: a near-constant channel is no loss
    channel = torch.full((32, 64), 0.03).to(torch.float16).float()
    channel[5, 0] = torch.tensor(0.03, dtype=torch.float16).nextafter(torch.tensor(1.0, dtype=torch.float16))
    kivi = KIVI(64, bits=4, axis="channel", group=32)
    assert (kivi.dequantize(kivi.quantize(channel)) - channel).abs().max() < 1e-6


def test_transform_coding_refuses_no_data_and_integer_norms():
    with pytest.raises(ValueError, match="at least one vector"):
        TransformCoder(64, 2).calibrate(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="norm_dtype=torch.int32 is not allowed"):
        TransformCoder(64, 2, norm_dtype=torch.int32)


def test_protected_channels_refuse_a_residual_fp16_cannot_hold():
    g = torch.Generator().manual_seed(0)
    codec = ProtectedChannels(64, 2, exact_groups=1, high_groups=1, rank=4, norm_dtype=torch.float32)
    codec.calibrate(torch.randn(256, 64, generator=g))
    big = torch.randn(4, 64, generator=g) * 1e5
    big[:, codec.exact_channels] = 0  # the exact tier (fp16, checked before) stays small
    with pytest.raises(ValueError, match="residual coefficient .* overflows its float16 storage"):
        codec.quantize(big)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(100, 8), r"dim=16 needs vectors \[\.\.\., 16\]"),
        (torch.zeros(0, 16), "at least one vector"),
        (torch.full((4, 16), float("nan")), "finite vectors"),
    ],
)
def test_an_eigen_rotation_refuses_data_it_cannot_be_fitted_on(x, message):
    rotation = EigenHadamard(16)
    with pytest.raises(ValueError, match=message):
        rotation.fit(x)
    torch.testing.assert_close(rotation.eigenvectors, torch.eye(16))  # unchanged


def _file(tmp_path, tamper):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "r.safetensors"
    rotation = make_rotation("fast_hadamard+block_so8_learned", 16)
    save_rotations(path, {"key_layer0": rotation}, {"rotation": "fast_hadamard+block_so8_learned", "dim": 16})
    with safe_open(str(path), framework="pt") as f:
        facts = json.loads(f.metadata()["tqlab"])
    tensors, facts = tamper(load_file(path), facts)
    save_file(tensors, path, metadata={"tqlab": json.dumps(facts)})
    return path


def _signs_times_3(tensors):
    return {k: v * 3 if "signs" in k else v for k, v in tensors.items()}


def _nan_generator(tensors):
    return {k: v.fill_(float("nan")) if "generator" in k else v for k, v in tensors.items()}


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda t, f: (t, {k: v for k, v in f.items() if k != "units"}), r"lacks the facts \['units'\]"),
        (lambda t, f: ({**t, "key_layer9.extra": torch.zeros(1)}, f), r"tensors of units \['key_layer9'\]"),
        (lambda t, f: ({}, f), "unit key_layer0's tensors do not rebuild its rotation"),
        (lambda t, f: (_signs_times_3(t), f), r"unit key_layer0 is not a rotation \(\|R Rᵀ − I\| = 8"),
        (lambda t, f: (_nan_generator(t), f), "unit key_layer0 holds NaN or Inf"),
    ],
)
def test_a_rotation_file_that_does_not_rebuild_rotations_is_refused(tmp_path, tamper, message):
    assert load_rotations(_file(tmp_path, lambda t, f: (t, f)))[0]  # the untampered file loads
    with pytest.raises(ValueError, match=message):
        load_rotations(_file(tmp_path, tamper))


def test_empty_batches_and_argument_types_the_baselines_could_not_take():
    from tqlab.quant import MixedPrecision

    for codec in (Int8Block(64), Int4Block(64), KIVI(64, axis="token"), KIVI(64, bits=4, axis="token")):
        assert codec.dequantize(codec.quantize(torch.zeros(0, 64))).shape == (0, 64)
    with pytest.raises(ValueError, match="pass at least one token"):
        KIVI(64, axis="channel").quantize(torch.zeros(0, 64))
    with pytest.raises(ValueError, match=r"choose 2 or 4 \(an integer\)"):
        KIVI(64, bits=2.0)
    for bits in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="is not a fractional bit width"):
            MixedPrecision(64, bits)
