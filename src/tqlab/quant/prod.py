"""TurboQuant Stage 2 (TurboQuant_prod): (b−1)-bit Stage 1 + a 1-bit QJL sketch of the residual.

For a unit key u with Stage-1 reconstruction û and residual r = u − û, store (idx, sign(S r), ‖r‖, ‖x‖).
The score ⟨q, û⟩ + √(π/2)/m · ‖r‖ · ⟨S q, sign(S r)⟩ is an unbiased estimate of ⟨q, u⟩ (times ‖x‖).

S is applied in the rotated domain (to Π r and Π q). Since Π is orthogonal and S has i.i.d. N(0, 1)
entries, S Π has the same law as S: this is the paper's estimator with projection S Π, at no extra cost.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..rotation import Rotation
from .codebook import MAX_BITS
from .codes import Code, buffer_nbytes, check_code, check_input, check_norm_dtype, in_row_blocks, store_norms
from .mse import TurboQuantMSE
from .packing import pack_bits, unpack_bits

_QJL_SEED_OFFSET = 7919  # keeps S independent of the rotation drawn from the same seed


@dataclasses.dataclass
class ProdCode(Code):
    bits: int
    qjl_dim: int
    indices: torch.Tensor  # uint8 [*shape, packed_row_bytes(dim, bits − 1)]
    signs: torch.Tensor  # uint8 [*shape, packed_row_bytes(qjl_dim, 1)], bit set = positive
    norms: torch.Tensor  # [*shape], ‖x‖
    residual_norms: torch.Tensor  # [*shape], ‖r‖ of the unit vector's residual


class TurboQuantProd(nn.Module):
    def __init__(
        self,
        dim: int,
        bits: int,
        rotation: str | Rotation = "random_haar",
        seed: int = 0,
        qjl_dim: int | None = None,
        norm_dtype: torch.dtype = torch.float16,
        **rotation_options,
    ):
        super().__init__()
        if isinstance(bits, bool) or not float(bits).is_integer() or not 2 <= int(bits) <= MAX_BITS:
            raise ValueError(
                f"bits={bits!r} is not allowed for TurboQuantProd: it takes an integer in 2..{MAX_BITS} "
                "(one bit goes to the QJL sketch, the rest to Stage 1)"
            )
        rescaled = sorted(k for k in ("norm_correction", "unbiased") if k in rotation_options)
        if rescaled:  # Stage 2 corrects Stage 1's raw centroids; a rescaled Stage 1 would bias the scores
            raise ValueError(
                f"TurboQuantProd takes no {rescaled}: its QJL stage already makes scores unbiased"
            )
        qjl_dim = dim if qjl_dim is None else qjl_dim
        if not isinstance(qjl_dim, int) or qjl_dim < 1:
            raise ValueError(f"qjl_dim={qjl_dim!r} must be a positive integer (default: dim)")
        self.dim, self.bits, self.qjl_dim = dim, int(bits), qjl_dim
        self.norm_dtype = check_norm_dtype(norm_dtype, "TurboQuantProd")
        self.mse = TurboQuantMSE(dim, self.bits - 1, rotation, seed, norm_dtype, **rotation_options)
        g = torch.Generator().manual_seed(int(seed) + _QJL_SEED_OFFSET)
        self.register_buffer(
            "projection", torch.randn(qjl_dim, dim, generator=g, dtype=torch.float64).float()
        )
        self.qjl_scale = math.sqrt(math.pi / 2) / qjl_dim

    @property
    def rotation(self) -> Rotation:
        return self.mse.rotation

    def quantize(self, x: torch.Tensor) -> ProdCode:
        native_codes = self.mse.encode_native(x, "TurboQuantProd", self.projection)
        if native_codes is None:
            packed, signs, norms, residual_norms = in_row_blocks(self._quantize_rows, x, self.dim)
        else:
            packed, norms, signs, residual_norms = native_codes
            residual_norms = store_norms(residual_norms, self.norm_dtype, "TurboQuantProd")
        return ProdCode(
            tuple(x.shape[:-1]), self.dim, self.bits, self.qjl_dim, packed, signs, norms, residual_norms
        )

    def _quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        unit, norms = self.mse._unit(x, "TurboQuantProd")
        y = self.rotation.apply(unit)
        idx = self.mse.encode_rotated(y)
        residual = y - self.mse.decode_rotated(idx)
        signs = pack_bits((residual @ self.projection.T >= 0).to(torch.uint8), 1)
        residual_norms = store_norms(residual.norm(dim=-1), self.norm_dtype, "TurboQuantProd")
        return pack_bits(idx, self.bits - 1), signs, norms, residual_norms

    def _parts(self, code: ProdCode) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated Stage-1 vectors and ±1 sign vectors, both fp32."""
        check_code(code, self.dim, self.bits, "TurboQuantProd")
        if code.qjl_dim != self.qjl_dim:
            raise ValueError(
                f"TurboQuantProd (qjl_dim={self.qjl_dim}) cannot decode a code of qjl_dim={code.qjl_dim}"
            )
        idx = unpack_bits(code.indices, self.bits - 1, self.dim, torch.int32)
        signs = unpack_bits(code.signs, 1, self.qjl_dim).float() * 2 - 1
        return self.mse.decode_rotated(idx), signs

    def score(self, queries: torch.Tensor, code: ProdCode) -> torch.Tensor:
        """Unbiased estimates of ⟨q, x⟩: [..., n_q, dim] × code [..., n_k] → [..., n_q, n_k].

        Keys are never reconstructed: the query is rotated and projected once.
        """
        q = self.rotation.apply(
            check_input(queries, self.dim, self.projection.device, "TurboQuantProd.score")
        )
        y_hat, signs = self._parts(code)
        mse_part = q @ y_hat.transpose(-1, -2)
        qjl_part = (q @ self.projection.T) @ signs.transpose(-1, -2)
        gamma = (self.qjl_scale * code.residual_norms.float()).unsqueeze(-2)
        return (mse_part + gamma * qjl_part) * code.norms.float().unsqueeze(-2)

    def dequantize(self, code: ProdCode) -> torch.Tensor:
        """The paper's DeQuant_prod, ‖x‖ · Πᵀ(ŷ + √(π/2)/m · ‖r‖ · Sᵀ s): for ablations; `score` estimates."""
        y_hat, signs = self._parts(code)
        y = y_hat + self.qjl_scale * code.residual_norms.float().unsqueeze(-1) * (signs @ self.projection)
        return self.rotation.inverse(y * code.norms.float().unsqueeze(-1))

    def constant_nbytes(self) -> int:
        return buffer_nbytes(self)
