"""Block-diagonal rotations: dim/8 independent 8×8 blocks in SO(8), applied in O(8·d).

A block rotation cannot move energy between blocks, so on keys with outlier channels it needs a mixing
transform in front (compose with fast_hadamard: "fast_hadamard+block_so8_learned").
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Rotation, haar_orthogonal, seeded_gaussian
from .triality import VIEWS, represent

BLOCK = 8


def _check_dim(dim: int, name: str) -> None:
    if not isinstance(dim, int) or dim < BLOCK or dim % BLOCK:
        raise ValueError(f"{name} needs dim divisible by {BLOCK}, got dim={dim!r}")


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """y_b = R_b x_b for each 8-block b of the last axis; blocks: [dim/8, 8, 8]."""
    xb = x.reshape(*x.shape[:-1], blocks.shape[0], BLOCK)
    return torch.einsum("...bj,bij->...bi", xb, blocks).reshape(x.shape)


class BlockSO8Static(Rotation):
    """Each block an independent Haar rotation of SO(8)."""

    def __init__(self, dim: int, seed: int = 0):
        _check_dim(dim, "block_so8_static")
        super().__init__(dim)
        self.register_buffer("blocks", haar_orthogonal((dim // BLOCK, BLOCK, BLOCK), seed).float())

    def _rotate(self, x):
        return apply_blocks(x, self.blocks)

    def _unrotate(self, y):
        return apply_blocks(y, self.blocks.transpose(-1, -2))


class BlockSO8Learned(Rotation):
    """Each block exp(ρ(A_b − A_bᵀ)) for a trainable A: [dim/8, 8, 8], orthogonal by construction.

    view: which representation of the Spin(8) element exp(A − Aᵀ) acts — "vector" (the rotation itself),
    "spinor_plus" or "spinor_minus" (the two half-spin representations, see tqlab.rotation.triality).
    init: "random" (generator entries N(0, init_scale²): a generic rotation) or "identity" (A = 0).
    """

    def __init__(
        self, dim: int, seed: int = 0, view: str = "vector", init: str = "random", init_scale: float = 1.0
    ):
        _check_dim(dim, "block_so8_learned")
        if view not in VIEWS:
            raise ValueError(f"view={view!r} is not one of {VIEWS}")
        if init not in ("random", "identity"):
            raise ValueError(f"init={init!r} is not one of ('random', 'identity')")
        super().__init__(dim)
        self.view = view
        shape = (dim // BLOCK, BLOCK, BLOCK)
        a = seeded_gaussian(shape, seed) * (init_scale / 2**0.5) if init == "random" else torch.zeros(shape)
        self.generator_params = nn.Parameter(a.float())

    def generators(self) -> torch.Tensor:
        skew = self.generator_params - self.generator_params.transpose(-1, -2)
        return represent(skew, self.view)

    def blocks(self) -> torch.Tensor:
        # float64 exponential: in float32 the blocks drift ~1e-6 from orthogonal at generic angles
        return torch.linalg.matrix_exp(self.generators().double()).to(self.generator_params.dtype)

    def _rotate(self, x):
        return apply_blocks(x, self.blocks())

    def _unrotate(self, y):
        return apply_blocks(y, self.blocks().transpose(-1, -2))
