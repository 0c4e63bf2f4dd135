"""Rotations Π applied before scalar quantization, all behind one interface (`Rotation`).

from tqlab.rotation import make_rotation
rot = make_rotation("fast_hadamard+block_so8_learned", dim=128, seed=0, view="spinor_plus")
y = rot.apply(x); x_again = rot.inverse(y); rot.matrix()
"""

from __future__ import annotations

from .. import registry
from .base import Identity, Rotation
from .butterfly import SO8Butterfly
from .compose import Composed
from .eigen import EigenHadamard
from .haar import DenseLearned, RandomHaar
from .hadamard import FastHadamard, fwht
from .so8 import BlockSO8Learned, BlockSO8Static
from .triality import VIEWS

ROTATIONS = {
    "identity": Identity,
    "random_haar": RandomHaar,
    "fast_hadamard": FastHadamard,
    "block_so8_static": BlockSO8Static,
    "block_so8_learned": BlockSO8Learned,
    "eigen_hadamard": EigenHadamard,
    "so8_butterfly": SO8Butterfly,
    "dense_learned": DenseLearned,
}


def make_rotation(name: str, dim: int, seed: int = 0, **options) -> Rotation:
    """Build a rotation by name; "a+b" composes (a first). `options` (view, init, …) go to the parts
    that take them, so "fast_hadamard+block_so8_learned" with view="spinor_minus" works. Names and
    options are checked against `tqlab.registry`, the list config validation reads too."""
    names = registry.rotation_parts(name)
    options = registry.rotation_options(name, options)
    parts = []
    for i, n in enumerate(names):
        kwargs = {k: v for k, v in options.items() if k in registry.ROTATIONS[n].options}
        parts.append(ROTATIONS[n](dim) if n == "identity" else ROTATIONS[n](dim, seed=seed + i, **kwargs))
    return parts[0] if len(parts) == 1 else Composed(parts)


__all__ = [
    "ROTATIONS",
    "VIEWS",
    "BlockSO8Learned",
    "BlockSO8Static",
    "Composed",
    "DenseLearned",
    "EigenHadamard",
    "FastHadamard",
    "Identity",
    "RandomHaar",
    "SO8Butterfly",
    "Rotation",
    "fwht",
    "make_rotation",
]
