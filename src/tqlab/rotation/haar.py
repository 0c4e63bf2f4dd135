"""Dense rotations: a random one, the paper's choice (Q of a QR decomposition of a Gaussian matrix), and a
learned one."""

from __future__ import annotations

import torch
from torch import nn

from .base import Rotation, haar_orthogonal


class RandomHaar(Rotation):
    def __init__(self, dim: int, seed: int = 0):
        super().__init__(dim)
        self.register_buffer("rotation", haar_orthogonal((dim, dim), seed).float())

    def _rotate(self, x):
        return x @ self.rotation.T

    def _unrotate(self, y):
        return y @ self.rotation


class DenseLearned(Rotation):
    """exp(A − Aᵀ) for a trainable dim × dim A, identity at start: every rotation of SO(dim) is reachable,
    at dim² parameters and a dense product per call — for small head_dim, or as the upper line a
    structured rotation (butterflies, blocks) is judged against."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__(dim)
        self.generator_params = nn.Parameter(torch.zeros(dim, dim))

    def exponential(self) -> torch.Tensor:
        skew = self.generator_params - self.generator_params.T
        return torch.linalg.matrix_exp(skew.double()).to(self.generator_params.dtype)

    def _rotate(self, x):
        return x @ self.exponential().T

    def _unrotate(self, y):
        return y @ self.exponential()
