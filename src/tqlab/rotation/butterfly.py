"""SO(8) butterflies: L layers of dim/8 independent SO(8) blocks with a perfect shuffle between layers.

The shuffle reads the [dim/8, 8] block grid column-wise, so each block of the next layer takes one
coordinate from eight different blocks of this one; after L = ⌈log₈ dim⌉ layers every output coordinate
depends on every input (the shuffles are undone at the end: a fixed permutation, so the butterfly with
identity blocks is the identity). Cost O(8 · dim · L) = O(dim log dim), orthogonal by construction (each block is
exp(A − Aᵀ)). Blocks start at the identity, so "eigen_hadamard+so8_butterfly" starts as the data-aware
rotation and training can only move away from it where the objective falls.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Rotation
from .so8 import BLOCK, _check_dim, apply_blocks


def butterfly_layers(dim: int) -> int:
    return max(1, math.ceil(math.log(dim) / math.log(BLOCK) - 1e-9))


class SO8Butterfly(Rotation):
    def __init__(self, dim: int, seed: int = 0):
        _check_dim(dim, "so8_butterfly")
        super().__init__(dim)
        self.generator_params = nn.Parameter(torch.zeros(butterfly_layers(dim), dim // BLOCK, BLOCK, BLOCK))

    def layer_blocks(self) -> torch.Tensor:
        """[L, dim/8, 8, 8] rotations (float64 exponential: float32 drifts ~1e-6 from orthogonal)."""
        skew = self.generator_params - self.generator_params.transpose(-1, -2)
        return torch.linalg.matrix_exp(skew.double()).to(self.generator_params.dtype)

    def _shuffle(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], -1, BLOCK).transpose(-1, -2).reshape(x.shape)

    def _unshuffle(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], BLOCK, -1).transpose(-1, -2).reshape(x.shape)

    def _rotate(self, x):
        blocks = self.layer_blocks()
        for i, layer in enumerate(blocks):
            x = apply_blocks(x if i == 0 else self._shuffle(x), layer)
        for _ in range(len(blocks) - 1):
            x = self._unshuffle(x)
        return x

    def _unrotate(self, y):
        blocks = self.layer_blocks()
        for _ in range(len(blocks) - 1):
            y = self._shuffle(y)
        for i in reversed(range(len(blocks))):
            y = apply_blocks(y, blocks[i].transpose(-1, -2))
            y = y if i == 0 else self._unshuffle(y)
        return y
