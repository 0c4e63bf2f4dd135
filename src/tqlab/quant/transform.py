"""Transform coding with unequal bits: the data-aware upper line for rotation + bit allocation.

Fitted once per (side, layer, KV head) on train-split vectors (`calibrate`): the eigenbasis V of their
second moment, integer bits per eigen-component by greedy reverse water-filling (0-bit components allowed,
`quant.gaussian.allocate_bits`), and a Gaussian Lloyd-Max codebook per component scaled to its standard
deviation. A vector x is coded as y = Vᵀ x̃, each y_i by its own b_i-bit codebook, the codes laid end to end
(Σ b_i = round(bits · dim) bits per vector, no padding between them).

scale="norm" (default) also stores ‖x‖ (norm_dtype) and codes x̃ = x · r/‖x‖, r² the calibration mean of
‖x‖²: one vector of outsized norm (an attention sink) then costs the same relative error as any other,
where without it its large components fall outside every codebook. scale="none" stores the codes alone.
Constants (V, the allocation, the codebooks) are counted by `constant_nbytes()`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..rotation import Rotation
from ..rotation.eigen import eigenbasis
from .codes import Code, buffer_nbytes, check_input, check_norm_dtype, row_norms, store_norms
from .gaussian import MAX_BITS, allocate_bits, gaussian_lloyd_max
from .mse import count_below
from .packing import pack_fields, unpack_fields

SCALES = ("norm", "none")


@dataclasses.dataclass
class TransformCode(Code):
    indices: torch.Tensor  # uint8 [*shape, ceil(Σ b_i / 8)]
    norms: torch.Tensor | None  # [*shape] (scale="norm") or None


class EigenBasis(Rotation):
    """y = x V, V orthogonal (columns: the eigenvectors, largest eigenvalue first); the identity until set."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.register_buffer("vectors", torch.eye(dim))

    def _rotate(self, x):
        return x @ self.vectors

    def _unrotate(self, y):
        return y @ self.vectors.T


class TransformCoder(nn.Module):
    def __init__(self, dim: int, bits: float, scale: str = "norm", norm_dtype: torch.dtype = torch.float16):
        super().__init__()
        budget = bits * dim
        if isinstance(bits, bool) or not 0 < bits <= MAX_BITS or abs(budget - round(budget)) > 1e-9:
            raise ValueError(
                f"bits={bits!r} is not allowed for TransformCoder at dim={dim}: it takes a number in "
                f"(0, {MAX_BITS}] whose product with dim is a whole number of bits per vector"
            )
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r} is not one of {SCALES}")
        self.dim, self.bits, self.budget = dim, bits, int(round(budget))
        self.scale, self.norm_dtype = scale, check_norm_dtype(norm_dtype, "TransformCoder")
        # V, set by calibrate; a Rotation, so that the cache's attention sums values in its domain
        self.rotation = EigenBasis(dim)
        self.register_buffer("std", torch.zeros(dim))  # all zero until calibrated
        self.register_buffer("widths", torch.zeros(dim, dtype=torch.uint8))
        self.register_buffer("typical_norm", torch.ones(()))
        # per component, its codebook's levels × its std, padded to the widest component's 2^b
        self.register_buffer("levels", torch.zeros(dim, 1))

    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Fit basis, allocation and scales on calibration vectors x [..., dim]; returns the bits per
        eigen-component (largest eigenvalue first)."""
        x = check_input(x, self.dim, self.std.device, "TransformCoder.calibrate").reshape(-1, self.dim)
        x = x.double()
        norms = x.norm(dim=-1, keepdim=True)
        if self.scale == "norm":
            self.typical_norm = norms.pow(2).mean().sqrt().float()
            x = x * (self.typical_norm.double() / norms.clamp_min(1e-300))
        evals, evecs = eigenbasis(x, self.dim)
        evals = evals.clamp_min(0.0)
        widths = allocate_bits(evals.cpu().numpy(), self.budget)
        self.rotation.vectors = evecs.float().to(self.std.device)
        self.std = evals.sqrt().float()
        self.widths = torch.as_tensor(widths, dtype=torch.uint8, device=self.std.device)
        levels = torch.zeros(self.dim, 2 ** int(widths.max()), dtype=torch.float64)
        for i, b in enumerate(widths):
            if b:
                levels[i, : 2**b] = torch.from_numpy(gaussian_lloyd_max(int(b))[0].copy())
        self.levels = (levels * evals.sqrt().cpu().unsqueeze(-1)).float().to(self.std.device)
        return self.widths

    def _check_fitted(self, what: str) -> None:
        if not self.std.any():
            raise ValueError(
                f"{what}: TransformCoder is not fitted yet; call calibrate(x) on train-split vectors"
            )

    def rotated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Vᵀ x̃, the stored norms or None)."""
        norms = None
        if self.scale == "norm":
            row = row_norms(x)
            norms = store_norms(row.squeeze(-1), self.norm_dtype, "TransformCoder")
            x = x * (self.typical_norm / row.clamp_min(torch.finfo(x.dtype).tiny))
        return self.rotation.apply(x), norms

    def quantize(self, x: torch.Tensor) -> TransformCode:
        self._check_fitted("TransformCoder.quantize")
        x = check_input(x, self.dim, self.std.device, "TransformCoder")
        y, norms = self.rotated(x)
        idx = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
        for b in self.widths.unique().tolist():
            if b:
                cols = (self.widths == b).nonzero().flatten()
                boundaries = torch.tensor(gaussian_lloyd_max(b)[1], dtype=torch.float32, device=y.device)
                idx[..., cols] = count_below(y[..., cols] / self.std[cols], boundaries, search=True).to(
                    torch.uint8
                )
        return TransformCode(tuple(x.shape[:-1]), self.dim, pack_fields(idx, self.widths), norms)

    def rotated_centroids(self, code: TransformCode) -> torch.Tensor:
        """ŷ in the eigenbasis, at the vector's own scale (fp32)."""
        self._check_fitted("TransformCoder.dequantize")
        idx = unpack_fields(code.indices, self.widths)
        y = self.levels[torch.arange(self.dim, device=idx.device), idx]
        if code.norms is not None:
            y = y * (code.norms.float() / self.typical_norm).unsqueeze(-1)
        return y

    def dequantize(self, code: TransformCode) -> torch.Tensor:
        return self.rotation.inverse(self.rotated_centroids(code))

    def score(self, queries: torch.Tensor, code: TransformCode) -> torch.Tensor:
        """⟨q, x̂⟩ = ⟨Vᵀq, ŷ⟩ for all query/key pairs, keys never rotated back."""
        q = check_input(queries, self.dim, self.std.device, "TransformCoder.score")
        return self.rotation.apply(q) @ self.rotated_centroids(code).transpose(-1, -2)

    def constant_nbytes(self) -> int:
        """Basis, scales, allocation and codebooks, as held."""
        return buffer_nbytes(self)
