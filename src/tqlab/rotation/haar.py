"""Dense random rotation, the paper's choice: Q of a QR decomposition of a Gaussian matrix."""

from __future__ import annotations

from .base import Rotation, haar_orthogonal


class RandomHaar(Rotation):
    def __init__(self, dim: int, seed: int = 0):
        super().__init__(dim)
        self.register_buffer("rotation", haar_orthogonal((dim, dim), seed).float())

    def _rotate(self, x):
        return x @ self.rotation.T

    def _unrotate(self, y):
        return y @ self.rotation
