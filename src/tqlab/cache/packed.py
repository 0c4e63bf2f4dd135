"""One side of a layer's codes in the layout the Triton kernels read: every KV head in one tensor per field.

TurboQuant-MSE: indices [B, KVH, capacity, d/8 · bits] uint8 and norms [B, KVH, capacity]; TurboQuant-Prod
adds its sketch, signs [B, KVH, capacity, d/8] uint8 and residual_norms [B, KVH, capacity] (its indices are
the Stage-1 codes, bits − 1 wide). 4-bit MSE codes of a codebook symmetric about 0 are stored as sign-magnitude
labels (`kernels.packed.sign_magnitude`), which the decode kernels read in fewer instructions; `head` gives the
codec's own indices back. The first `length` tokens are filled. The capacity grows by half when it
runs out, so appending a decode step's token is a write, not a copy of the cache (amortised: each token is
copied at most a few times over a run); a `reserve` of tokens sizes the first allocation, so that a run that
stays within it never grows or copies. `nbytes` counts the filled tokens (what is stored),
`allocated_nbytes` the tensors whole.
"""

from __future__ import annotations

import torch

from ..quant import Centered, TurboQuantMSE, TurboQuantProd
from ..quant.mse import MSECode
from ..quant.prod import ProdCode

GROWTH = 1.5
ALIGN = 128  # capacities in whole kernel blocks of tokens


def stored(codec):
    """The codec whose codes are stored: `codec`, or the one under its mean removal (`Centered`: the kernels
    read the codes of x − μ, and the cache adds the mean's share to their attention)."""
    return codec.inner if type(codec) is Centered else codec


def stage1(codec):
    """The TurboQuant-MSE codec whose codes the kernels decode: the stored codec, or its Prod's Stage 1."""
    codec = stored(codec)
    return codec.mse if type(codec) is TurboQuantProd else codec


def kernel_centroids(codec) -> torch.Tensor | None:
    """The codebook the kernels decode `codec`'s codes with (centroids, times the unbiased scale), or None
    when its stored codes are not plain TurboQuant-MSE or -Prod codes the kernels read (other codecs, a
    query metric, norm correction, Stage-1 widths outside 2..4 bits, a QJL sketch of other than head_dim
    coordinates, head_dim not a power of two >= 32). A mean removed around them is fine."""
    codec = stored(codec)
    if type(codec) is TurboQuantProd and codec.qjl_dim != codec.dim:
        return None
    mse = stage1(codec)
    if type(mse) is not TurboQuantMSE or mse.norm_correction:
        return None
    if not 2 <= mse.bits <= 4 or mse.dim < 32 or mse.dim & (mse.dim - 1):
        return None
    return mse.centroids * (mse.unbiased_scale or 1.0)


def sign_magnitude(codec) -> bool:
    """Whether the cache stores `codec`'s codes as sign-magnitude labels: 4-bit TurboQuant-MSE codes (not
    Prod's Stage 1) of a codebook symmetric about 0."""
    codec = stored(codec)
    return (
        type(codec) is TurboQuantMSE
        and codec.bits == 4
        and torch.equal(codec.boundaries, -codec.boundaries.flip(0))
    )


class PackedCodes:
    def __init__(
        self, bits: int, dim: int, norm_dtype: torch.dtype, reserve: int = 0, sketch: bool = False,
        sign_magnitude: bool = False,
    ):  # fmt: skip
        """bits: of the stored indices (Prod's Stage 1); sketch: Prod's signs and residual norms too;
        sign_magnitude: 4-bit indices stored as sign-magnitude labels."""
        self.bits, self.dim, self.norm_dtype = bits, dim, norm_dtype
        self.reserve, self.sketch, self.sign_magnitude = reserve, sketch, sign_magnitude
        self.fields = ("indices", "signs", "norms", "residual_norms") if sketch else ("indices", "norms")
        self.tensors: dict[str, torch.Tensor] | None = None
        self.length = 0

    def emptied(self) -> PackedCodes:
        """Storage of the same kind holding no tokens (its tensors released)."""
        return PackedCodes(
            self.bits, self.dim, self.norm_dtype, self.reserve, self.sketch, self.sign_magnitude
        )

    @property
    def indices(self) -> torch.Tensor | None:
        """The whole indices tensor, filled or not (its shape gives the capacity)."""
        return None if self.tensors is None else self.tensors["indices"]

    def _row_shape(self, name: str) -> tuple:
        return {"indices": (self.dim // 8 * self.bits,), "signs": (self.dim // 8,)}.get(name, ())

    def append(self, *tensors: torch.Tensor) -> None:
        """Add tokens, one tensor per field in `fields` order ([B, KVH, T, bytes] or [B, KVH, T])."""
        need = self.length + tensors[0].shape[2]
        if self.tensors is None or need > self.indices.shape[2]:
            capacity = max(need, int(GROWTH * self.length), self.reserve)
            self._allocate(tensors[0].shape[:2], capacity, tensors[0].device)
        for name, t in zip(self.fields, tensors, strict=True):
            self.tensors[name][:, :, self.length : need] = t
        self.length = need

    def grow_to(self, capacity: int) -> None:
        """Room for at least `capacity` tokens (one copy if the tensors are smaller)."""
        if self.tensors is not None and capacity > self.indices.shape[2]:
            self._allocate(self.indices.shape[:2], capacity, self.indices.device)

    def _allocate(self, leading, capacity: int, device) -> None:
        capacity = -(-capacity // ALIGN) * ALIGN
        grown = {}
        for name in self.fields:
            dtype = torch.uint8 if self._row_shape(name) else self.norm_dtype
            grown[name] = torch.empty(*leading, capacity, *self._row_shape(name), dtype=dtype, device=device)
            if self.length:
                grown[name][:, :, : self.length] = self.tensors[name][:, :, : self.length]
        self.tensors = grown

    def stores(self) -> tuple[torch.Tensor, ...]:
        """The whole tensors, filled or not, in `fields` order: what a fused quantize writes into at a
        token position held on the device (the caller moves `length`)."""
        return tuple(self.tensors[name] for name in self.fields)

    def drop_front(self, n: int) -> None:
        """Forget the first n tokens (copied down: the kernels read rows from the start)."""
        if n:
            rest = self.length - n
            for t in self.tensors.values():
                t[:, :, :rest] = t[:, :, n : self.length].clone()
            self.length = rest

    def views(self) -> dict[str, torch.Tensor]:
        """The filled tokens of each field, [B, KVH, length, ...], without a copy."""
        return {name: t[:, :, : self.length] for name, t in self.tensors.items()}

    def head(self, h: int) -> MSECode | ProdCode | None:
        """KV head h's codes as the codec's own code (views; sign-magnitude labels are copied back into the
        codec's indices), for the PyTorch reference path."""
        if not self.length:
            return None
        v = {name: t[:, h] for name, t in self.views().items()}
        if self.sign_magnitude:
            from ..kernels.packed import sign_magnitude

            v["indices"] = sign_magnitude(v["indices"])
        shape = (v["indices"].shape[0], self.length)
        if self.sketch:
            return ProdCode(shape, self.dim, self.bits + 1, self.dim, **v)
        return MSECode(shape, self.dim, self.bits, **v)

    def allocated_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tensors or {}).values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.views().values()) if self.length else 0
