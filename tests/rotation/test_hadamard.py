"""FastHadamard's dense form (taken on GPUs and on CPUs up to d = 128 or outside the passes' batch sizes) across
inference and training."""

import pytest
import torch

from tqlab.rotation import make_rotation


def test_the_dense_form_built_during_inference_serves_a_later_fit():
    r = make_rotation("fast_hadamard", 64, seed=1)
    with torch.inference_mode():
        r.apply(torch.randn(3, 64))  # builds the cached dense form, as an evaluation would
    x = torch.randn(3, 64, requires_grad=True)
    r.apply(x).pow(2).sum().backward()  # autograd through it, as a later fit would
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)  # orthogonal: ∇‖Πx‖² = 2x


def test_the_dense_form_and_the_butterfly_passes_are_one_rotation():
    from tqlab.rotation.hadamard import fwht

    r = make_rotation("fast_hadamard", 128, seed=2)
    x = torch.randn(5, 128, dtype=torch.float64)
    passes = fwht(x * r.signs_in.double()) * (r.scale * r.signs_out.double())
    torch.testing.assert_close(r.apply(x), passes, rtol=0, atol=1e-6)  # the dense form is built in fp32


@pytest.mark.parametrize("d", [4, 8, 16, 32, 512, 2048])
def test_fwht_is_the_sylvester_matrix_at_every_stage_count(d):
    """One stage (d <= 16), a 2-point last stage (32), three and more stages (512, 2048); leading batch axes
    and a non-contiguous input, against the dense Sylvester matrix in float64."""
    from tqlab.rotation.hadamard import _sylvester, fwht

    x = torch.randn(3, 2, d, dtype=torch.float64).transpose(0, 1)  # [2, 3, d], not contiguous
    torch.testing.assert_close(fwht(x), x @ _sylvester(d, x), rtol=0, atol=1e-9 * d)


def test_fwht_refuses_lengths_that_are_not_powers_of_two():
    from tqlab.rotation.hadamard import fwht

    with pytest.raises(ValueError, match="power-of-two length along the last axis, got 24"):
        fwht(torch.randn(2, 24))
