"""Eigenbasis × Hadamard: R = H · Uᵀ, U the eigenvectors of a head's train-split second moment.

Uᵀ decorrelates the vectors (component i has variance λ_i); the Hadamard then gives every output coordinate
exactly the mean variance Σλ_i/d (each row of H has entries ±1/√d), so one equal-bit scalar codebook and one
norm per vector are matched to the data — the idea of OSCAR's key rotation. basis="key" takes U from the
vectors the codec sees; basis="query" from the second moment of the head's queries, so that the directions
queries read are the ones spread evenly. (OSCAR also permutes the eigen-coordinates by a bit reversal
before a block Hadamard; a full-length Hadamard equalises variances whatever the order.)
"""

from __future__ import annotations

import torch

from .base import Rotation
from .hadamard import FastHadamard

BASES = ("key", "query")


def eigenbasis(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors as columns) of the second moment of x [n, d], float64, largest first;
    refused (naming why) for vectors of another `dim`, none at all, or NaN/Inf among them."""
    if x.ndim == 0 or (dim is not None and x.shape[-1] != dim):
        raise ValueError(f"an eigenbasis of dim={dim} needs vectors [..., {dim}]; got shape {tuple(x.shape)}")
    x = x.reshape(-1, x.shape[-1]).double()
    if len(x) == 0:
        raise ValueError("an eigenbasis needs at least one vector; got none")
    if not torch.isfinite(x).all():
        raise ValueError("an eigenbasis needs finite vectors; got NaN or Inf")
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
    return evals.flip(0), evecs.flip(1)


class EigenHadamard(Rotation):
    def __init__(self, dim: int, seed: int = 0, basis: str = "key"):
        if basis not in BASES:
            raise ValueError(f"basis={basis!r} is not one of {BASES}")
        super().__init__(dim)
        self.basis = basis
        self.hadamard = FastHadamard(dim, seed=seed)
        self.register_buffer("eigenvectors", torch.eye(dim))  # identity until fitted

    def fit(self, x: torch.Tensor) -> torch.Tensor:
        """Set U from vectors x [n, dim] (keys as the codec sees them, or queries for basis="query");
        returns the eigenvalues, largest first."""
        evals, evecs = eigenbasis(x, self.dim)
        if torch.linalg.det(evecs.double()) < 0:  # a proper rotation (det +1), not a reflection
            evecs = evecs.clone()
            evecs[:, -1] = -evecs[:, -1]
        self.eigenvectors = evecs.float().to(self.eigenvectors.device)
        return evals

    def _rotate(self, x):
        return self.hadamard.apply(x @ self.eigenvectors)

    def _unrotate(self, y):
        return self.hadamard.inverse(y) @ self.eigenvectors.T
