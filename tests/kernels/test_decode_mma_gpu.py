"""Device-side checks of the register-fragment decode kernel (`kernels/decode_mma.py`, Gluon) that its parity
tests in test_decode cannot see: which decode it takes. Gluon runs on a GPU only."""

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")
if not torch.cuda.is_available():
    pytest.skip("Gluon runs on a GPU only", allow_module_level=True)

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

from tqlab.kernels import centroid_table, decode_mma  # noqa: E402
from tqlab.quant import TurboQuantMSE  # noqa: E402


@gluon.jit
def _sign_magnitude_check(table, out):
    gl.store(out, decode_mma._is_sign_magnitude(table, 4).to(gl.int32))


@pytest.mark.parametrize("shift", [0.0, 0.05])
def test_the_short_4_bit_decode_is_taken_only_for_a_sign_magnitude_table(shift):
    """The kernel's on-device check, which picks its loop, against the same property read on the host from
    the table's fp16 bits (t[l ^ 8] = −t[l] for every label l): only a symmetric codebook's table in label
    order has it, not the codec's own index order, nor a shifted codebook in either order. A check that said
    no would only cost speed (the general decode is exact), so the parity tests cannot catch it."""
    centroids = TurboQuantMSE(128, 4, rotation="fast_hadamard", seed=3).centroids + shift
    for labels in (True, False):
        table = centroid_table(centroids.cuda(), sign_magnitude=labels)
        bits = table.view(torch.int16).int() & 0xFFFF
        expected = bool(((bits[torch.arange(16, device="cuda") ^ 8] ^ 0x8000) == bits).all())
        assert expected == (labels and shift == 0)  # the host-side reading is right too
        out = torch.full((1,), -1, dtype=torch.int32, device="cuda")
        _sign_magnitude_check[(1,)](table, out, num_warps=1)
        assert out.item() == int(expected)
