"""One side of a layer's codes in the layout the Triton kernels read: every KV head in one tensor.

indices [B, KVH, capacity, d/8 · bits] uint8 and norms [B, KVH, capacity], of which the first `length`
tokens are filled. The capacity grows by half when it runs out, so appending a decode step's token is a
write, not a copy of the cache (amortised: each token is copied at most a few times over a run); a
`reserve` of tokens sizes the first allocation, so that a run that stays within it never grows or copies.
`nbytes` counts the filled tokens (what is stored), `allocated_nbytes` the tensors whole.
"""

from __future__ import annotations

import torch

from ..quant import TurboQuantMSE
from ..quant.mse import MSECode

GROWTH = 1.5
ALIGN = 128  # capacities in whole kernel blocks of tokens


def kernel_centroids(codec) -> torch.Tensor | None:
    """The codebook the kernels decode `codec`'s codes with (centroids, times the unbiased scale), or None
    when its codes are not plain TurboQuant-MSE codes the kernels read (other codecs, a mean, a query metric,
    norm correction, widths outside 2..4 bits, head_dim not a power of two >= 32)."""
    if type(codec) is not TurboQuantMSE or codec.norm_correction:
        return None
    if not 2 <= codec.bits <= 4 or codec.dim < 32 or codec.dim & (codec.dim - 1):
        return None
    return codec.centroids * (codec.unbiased_scale or 1.0)


class PackedCodes:
    def __init__(self, bits: int, dim: int, norm_dtype: torch.dtype, reserve: int = 0):
        self.bits, self.dim, self.norm_dtype, self.reserve = bits, dim, norm_dtype, reserve
        self.indices: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.length = 0

    def append(self, indices: torch.Tensor, norms: torch.Tensor) -> None:
        """Add tokens: indices [B, KVH, T, bytes], norms [B, KVH, T]."""
        need = self.length + indices.shape[2]
        if self.indices is None or need > self.indices.shape[2]:
            capacity = max(need, int(GROWTH * self.length), self.reserve)
            self._allocate(indices.shape[:2], capacity, indices.device)
        self.indices[:, :, self.length : need] = indices
        self.norms[:, :, self.length : need] = norms
        self.length = need

    def grow_to(self, capacity: int) -> None:
        """Room for at least `capacity` tokens (one copy if the tensors are smaller)."""
        if self.indices is not None and capacity > self.indices.shape[2]:
            self._allocate(self.indices.shape[:2], capacity, self.indices.device)

    def _allocate(self, leading, capacity: int, device) -> None:
        capacity = -(-capacity // ALIGN) * ALIGN
        grown_i = torch.empty(*leading, capacity, self.dim // 8 * self.bits, dtype=torch.uint8, device=device)
        grown_n = torch.empty(*leading, capacity, dtype=self.norm_dtype, device=device)
        if self.length:
            grown_i[:, :, : self.length] = self.indices[:, :, : self.length]
            grown_n[:, :, : self.length] = self.norms[:, :, : self.length]
        self.indices, self.norms = grown_i, grown_n

    def write(self, positions: torch.Tensor, indices: torch.Tensor, norms: torch.Tensor) -> None:
        """Store tokens at token positions given on the device ([T] int64), within the capacity; the
        caller moves `length` (a CUDA graph replays this write without the host)."""
        self.indices.index_copy_(2, positions, indices)
        self.norms.index_copy_(2, positions, norms)

    def drop_front(self, n: int) -> None:
        """Forget the first n tokens (copied down: the kernels read rows from the start)."""
        if n:
            rest = self.length - n
            self.indices[:, :, :rest] = self.indices[:, :, n : self.length].clone()
            self.norms[:, :, :rest] = self.norms[:, :, n : self.length].clone()
            self.length = rest

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled tokens, [B, KVH, length, bytes] and [B, KVH, length], without a copy."""
        return self.indices[:, :, : self.length], self.norms[:, :, : self.length]

    def head(self, h: int) -> MSECode | None:
        """KV head h's codes as the codec's own MSECode (views), for the PyTorch reference path."""
        if not self.length:
            return None
        indices, norms = self.views()
        return MSECode((indices.shape[0], self.length), self.dim, self.bits, indices[:, h], norms[:, h])

    def allocated_nbytes(self) -> int:
        if self.indices is None:
            return 0
        return (
            self.indices.numel() * self.indices.element_size()
            + self.norms.numel() * self.norms.element_size()
        )

    def nbytes(self) -> int:
        if not self.length:
            return 0
        indices, norms = self.views()
        return indices.numel() * indices.element_size() + norms.numel() * norms.element_size()
