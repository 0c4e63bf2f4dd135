"""TurboQuant Stage 1 (TurboQuant_mse): norm + rotation + Lloyd-Max scalar codes, bit-packed."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..rotation import FastHadamard, Rotation, make_rotation
from . import native
from .codebook import check_dim_bits, coordinate_distortion, lloyd_max_codebook
from .codes import (
    Code,
    buffer_nbytes,
    check_code,
    check_input,
    check_norm_dtype,
    in_row_blocks,
    row_norms,
    store_norms,
)
from .packing import pack_bits, unpack_bits


@dataclasses.dataclass
class MSECode(Code):
    bits: int
    indices: torch.Tensor  # uint8 [*shape, packed_row_bytes(dim, bits)]
    norms: torch.Tensor  # [*shape], norm_dtype


def build_rotation(rotation: str | Rotation, dim: int, seed: int, options: dict) -> Rotation:
    if isinstance(rotation, Rotation):
        if rotation.dim != dim or options:
            raise ValueError(
                f"a Rotation instance of dim {rotation.dim} was given for dim={dim} (with options {options})"
            )
        return rotation
    return make_rotation(rotation, dim, seed=seed, **options)


# Up to this many elements a CPU encode takes the binary search too: its one op beats the passes' 2(2^b − 1)
# small ones (at 1 024 elements, 4 bits: 11 against 47 µs; at 16 384 the passes win, 87 against 223 µs; torch
# 2.13, one thread, tools/research/cpu_quantize_parts.py) — a decode step encodes one token per head.
CPU_SEARCH_MAX_ELEMENTS = 4096


def count_below(y: torch.Tensor, boundaries: torch.Tensor, search: bool) -> torch.Tensor:
    """#{boundaries < y} per element (uint8, or int64 from the search past 15 boundaries). search: one binary search
    (bucketize) — on an H200 2.5× / 5.6× / 10.9× faster than the passes at 2 / 3 / 4 bits
    (benchmarks/gpu_encode_search.py); otherwise 2^b − 1 vectorised compare passes, 2–4× faster on CPU than
    bucketize at these sizes. Both count ties the same way (a boundary equal to y is
    not below it)."""
    if search:
        idx = torch.bucketize(y, boundaries)
        return idx.to(torch.uint8) if len(boundaries) <= 15 else idx
    # Counted in y's float type: on CPU a comparison into a float tensor is vectorised, into bool ~4× slower,
    # and float → int32 → uint8 is faster than float → uint8 (torch 2.13; tools/research/cpu_quantize_parts.py).
    y = y.detach()  # out= takes no tensor that requires grad; codes carry none
    count, above = torch.empty_like(y), torch.empty_like(y)
    torch.gt(y, boundaries[0], out=count)
    for boundary in boundaries[1:]:
        count += torch.gt(y, boundary, out=above)
    return count.to(torch.int32).to(torch.uint8)


class TurboQuantMSE(nn.Module):
    """x ↦ (‖x‖, idx = argmin_k |(Π x/‖x‖)_j − c_k|), decoded as ‖x‖ · Πᵀ c[idx] in float32.

    norm_correction: rescale the centroid vector c[idx] to unit norm before the inverse rotation, so
    decoded vectors keep their stored norm (often better end to end; both decoders are biased).
    unbiased: divide it by 1 − D instead, D = E‖u − û‖² of the codebook: by the centroid condition
    E⟨u, û⟩ = E‖û‖² = 1 − D, and by the rotation's symmetry E[û | u] is along u, so ⟨q, x̂⟩ is then unbiased
    over random rotations — at no cost in bits, and at a higher MSE.
    """

    def __init__(
        self,
        dim: int,
        bits: int,
        rotation: str | Rotation = "random_haar",
        seed: int = 0,
        norm_dtype: torch.dtype = torch.float16,
        norm_correction: bool = False,
        unbiased: bool = False,
        **rotation_options,
    ):
        super().__init__()
        check_dim_bits(dim, bits, "TurboQuantMSE")
        if norm_correction and unbiased:
            raise ValueError("TurboQuantMSE: norm_correction and unbiased are two rescalings; choose one")
        self.dim, self.bits = dim, int(bits)
        self.norm_dtype = check_norm_dtype(norm_dtype, "TurboQuantMSE")
        self.norm_correction = norm_correction
        self.unbiased_scale = 1 / (1 - coordinate_distortion(dim, self.bits)) if unbiased else None
        self.rotation = build_rotation(rotation, dim, seed, rotation_options)
        centroids, boundaries = lloyd_max_codebook(dim, self.bits)
        self.register_buffer("centroids", torch.tensor(centroids, dtype=torch.float32))
        self.register_buffer("boundaries", torch.tensor(boundaries, dtype=torch.float32))

    # -- the rotated domain, shared with TurboQuantProd --------------------------------------------
    def encode_rotated(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid indices of rotated unit vectors (uint8 for bits <= 4, else int64)."""
        search = self.bits > 4 or y.is_cuda or y.numel() <= CPU_SEARCH_MAX_ELEMENTS
        return count_below(y, self.boundaries, search=search)

    def decode_rotated(self, idx: torch.Tensor) -> torch.Tensor:
        # index_select with int32 indices: 5–7× faster on CPU than advanced indexing with int64 ones
        y = self.centroids.index_select(0, idx.reshape(-1).int()).view(idx.shape)
        if self.norm_correction:
            y = y / y.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
        elif self.unbiased_scale is not None:
            y = y * self.unbiased_scale
        return y

    def _unit(self, x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = check_input(x, self.dim, self.centroids.device, codec)
        norm = row_norms(x)
        unit = x / torch.where(norm > 0, norm, 1.0)  # a subnormal norm too: the quotient stays a unit vector
        return unit, store_norms(norm.squeeze(-1), self.norm_dtype, codec)

    # -- public API --------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> MSECode:
        native_codes = self.encode_native(x, "TurboQuantMSE")
        indices, norms = native_codes or in_row_blocks(self._quantize_rows, x, self.dim)
        return MSECode(tuple(x.shape[:-1]), self.dim, self.bits, indices, norms)

    def _quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit, norms = self._unit(x, "TurboQuantMSE")
        return pack_bits(self.encode_rotated(self.rotation.apply(unit)), self.bits), norms

    def encode_native(
        self, x: torch.Tensor, codec: str, projection: torch.Tensor | None = None
    ) -> tuple | None:
        """x [..., dim] → (packed codes, stored norms), and with Prod's projection S also (packed signs of S·r,
        fp32 ‖r‖) of the Stage-1 residual r, by the native CPU encode (`quant.native`: one compiled pass, fast
        Hadamard included); None where that does not apply (not on a CPU, more than 4 bits, dim > 8192,
        TQLAB_NATIVE=0 or no C compiler, NaN or Inf with fast Hadamard), and the tensor path (`_quantize_rows`)
        codes x instead, or names what is wrong with it."""
        cpu = isinstance(x, torch.Tensor) and x.device.type == "cpu"
        if not (cpu and self.bits <= native.MAX_BITS and native.library() is not None):
            return None  # before any check or copy: the tensor path makes its own
        # NaN and Inf: found in the norms by the one pass, by `_unit` in each block otherwise
        x = check_input(x, self.dim, self.centroids.device, codec, finite=False)
        rows = x.reshape(-1, self.dim)
        if not native.applies(rows, self.bits):
            return None
        if type(self.rotation) is FastHadamard:  # rotated in the same pass
            hadamard = (self.rotation.signs_in, self.rotation.scale * self.rotation.signs_out)
            packed, norms, signs, residual_norms = native.encode(
                rows, self.bits, self.boundaries, self.centroids, hadamard, projection
            )
            if not torch.isfinite(norms).all():  # NaN or Inf in x: the tensor path names it
                return None
            norms = store_norms(norms, self.norm_dtype, codec)
            columns = (packed, norms) if projection is None else (packed, norms, signs, residual_norms)
        else:  # rotated by torch, in blocks that keep its temporaries in L2

            def encode_block(block: torch.Tensor) -> tuple[torch.Tensor, ...]:
                unit, norms = self._unit(block, codec)
                y = self.rotation.apply(unit)
                packed, _, signs, residual_norms = native.encode(
                    y, self.bits, self.boundaries, self.centroids, None, projection
                )
                return (packed, norms) if projection is None else (packed, norms, signs, residual_norms)

            columns = in_row_blocks(encode_block, rows, self.dim)
        return tuple(column.reshape((*x.shape[:-1], *column.shape[1:])) for column in columns)  # x: [d] too

    def rotated_centroids(self, code: MSECode) -> torch.Tensor:
        """c[idx] · ‖x‖ in the rotated domain (fp32): what attention over codes multiplies with."""
        check_code(code, self.dim, self.bits, "TurboQuantMSE")
        idx = unpack_bits(code.indices, self.bits, self.dim, torch.int32)
        return self.decode_rotated(idx) * code.norms.float().unsqueeze(-1)

    def dequantize(self, code: MSECode) -> torch.Tensor:
        return self.rotation.inverse(self.rotated_centroids(code))

    def score(self, queries: torch.Tensor, code: MSECode) -> torch.Tensor:
        """⟨q, x̂⟩ for all query/key pairs: [..., n_q, dim] × code [..., n_k] → [..., n_q, n_k].

        Computed in the rotated domain (⟨q, Πᵀŷ⟩ = ⟨Πq, ŷ⟩): keys are never rotated back.
        """
        q = check_input(queries, self.dim, self.centroids.device, "TurboQuantMSE.score")
        return self.rotation.apply(q) @ self.rotated_centroids(code).transpose(-1, -2)

    def constant_nbytes(self) -> int:
        """Per-layer constants (codebook, rotation), not counted per vector."""
        return buffer_nbytes(self)
