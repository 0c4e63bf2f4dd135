"""The interface every rotation follows: y = Π x along the last axis, and back."""

from __future__ import annotations

import abc

import torch
from torch import nn


class Rotation(nn.Module, abc.ABC):
    """An orthogonal map Π on R^dim acting on the last axis of a tensor of row vectors.

    Subclasses implement `_rotate` and `_unrotate` at their true cost (a dense matmul only where Π is
    dense); `matrix()` is derived from `apply`, so tests of it test the fast path.
    """

    def __init__(self, dim: int):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive integer")
        self.dim = dim

    def apply(self, x):  # noqa: A003 - the interface's verb; nn.Module.apply(fn) still works below
        if callable(x) and not isinstance(x, torch.Tensor):
            return super().apply(x)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects vectors of dim {self.dim}, got shape {tuple(x.shape)}"
            )
        return self._rotate(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if y.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects vectors of dim {self.dim}, got shape {tuple(y.shape)}"
            )
        return self._unrotate(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def matrix(self) -> torch.Tensor:
        """Π as a dense [dim, dim] matrix (for tests and analysis, not for the hot path)."""
        eye = torch.eye(self.dim, dtype=torch.float32, device=self._device())
        return self.apply(eye).T

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    @abc.abstractmethod
    def _rotate(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _unrotate(self, y: torch.Tensor) -> torch.Tensor: ...


class Identity(Rotation):
    def _rotate(self, x):
        return x

    def _unrotate(self, y):
        return y


def seeded_gaussian(shape, seed: int) -> torch.Tensor:
    """float64 N(0, 1) samples from a private generator (no global RNG state is touched)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def haar_orthogonal(shape, seed: int) -> torch.Tensor:
    """Haar-distributed rotations in SO(n) (det +1), float64, batched over leading dims: QR with sign fix."""
    q, r = torch.linalg.qr(seeded_gaussian(shape, seed))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(q) < 0  # Haar on O(n) → SO(n): flip one column where det = −1
    q[..., :, 0] = torch.where(flip.unsqueeze(-1), -q[..., :, 0], q[..., :, 0])
    return q
