"""Protected channels: value (or key) channel groups in three tiers by sensitivity, each channel counted once.

Channels come in groups of 8. From calibration vectors (the train split) every group gets a sensitivity,
Σ_t w_t ‖x_t[g]‖²: with w_t = Σ_q p_qt², the attention weights' squares summed over the queries that read
token t, this is the expected attention-output error that energy-proportional, token-independent coding noise
in group g causes (docs/results.md, value sensitivity); with w = 1 it is the group's energy. The
`exact_groups` most sensitive groups are stored exactly (fp16), the next `high_groups` by one TurboQuant-MSE
instance at `high_bits`, the rest by another at the base `bits`; each instance has its own norm and its own
random Haar rotation over its channels. An optional rank-r residual stores, per vector, r fp16 coefficients of
what the tiers missed in the top-r principal directions of the calibration residual. Per-vector bytes: the
exact channels, both instances' codes and norms, the coefficients; per-unit constants: the channel sets, the
residual basis, the codebooks and rotations.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .codes import Code, buffer_nbytes, check_input
from .mse import TurboQuantMSE

GROUP = 8


@dataclasses.dataclass
class ProtectedCode(Code):
    exact: torch.Tensor  # fp16 [*shape, 8 · exact_groups]
    high: Code | None
    base: Code
    residual: torch.Tensor  # fp16 [*shape, rank]


class ProtectedChannels(nn.Module):
    def __init__(
        self,
        dim: int,
        bits: int,
        exact_groups: int = 1,
        high_groups: int = 1,
        high_bits: int = 4,
        rank: int = 0,
        seed: int = 0,
        norm_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        groups = dim // GROUP
        if dim % GROUP or exact_groups < 0 or high_groups < 0 or exact_groups + high_groups >= groups:
            raise ValueError(
                f"ProtectedChannels: exact_groups={exact_groups} + high_groups={high_groups} must leave at least "
                f"one of the {groups} groups of {GROUP} channels (dim={dim}) at the base bits"
            )
        if not bits < high_bits <= 8 or not 0 <= rank <= dim:
            raise ValueError(
                f"ProtectedChannels: high_bits={high_bits} must lie in ({bits}, 8] and rank={rank} in 0..{dim}"
            )
        self.dim, self.bits, self.rank = dim, int(bits), int(rank)
        self.exact_groups, self.high_groups, self.high_bits = exact_groups, high_groups, high_bits
        base_dim = dim - GROUP * (exact_groups + high_groups)
        self.high_codec = (
            TurboQuantMSE(GROUP * high_groups, high_bits, "random_haar", seed, norm_dtype)
            if high_groups
            else None
        )
        self.base_codec = TurboQuantMSE(base_dim, bits, "random_haar", seed + 1, norm_dtype)
        for name in ("exact_channels", "high_channels", "base_channels"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long))
        self.register_buffer("basis", torch.zeros(dim, self.rank))

    def calibrate(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Rank the groups by Σ_t w_t ‖x_t[g]‖² over calibration vectors x [n, dim] (weights [n], default 1),
        assign the tiers, and fit the residual basis; return the groups' scores."""
        x = check_input(x, self.dim, self.basis.device, "ProtectedChannels.calibrate").reshape(-1, self.dim)
        w = torch.ones(len(x), dtype=torch.float64) if weights is None else weights.double().flatten().cpu()
        if len(w) != len(x):
            raise ValueError(f"ProtectedChannels.calibrate: {len(w)} weights for {len(x)} vectors")
        energy = x.double().cpu().pow(2).view(len(x), -1, GROUP).sum(-1)  # [n, groups]
        scores = w @ energy
        order = scores.argsort(descending=True)
        channels = (order[:, None] * GROUP + torch.arange(GROUP)).flatten()
        cut = [GROUP * self.exact_groups, GROUP * (self.exact_groups + self.high_groups)]
        device = self.basis.device
        self.exact_channels = channels[: cut[0]].sort().values.to(device)
        self.high_channels = channels[cut[0] : cut[1]].sort().values.to(device)
        self.base_channels = channels[cut[1] :].sort().values.to(device)
        if self.rank:
            residual = (x - self._tiers_decoded(self._tiers(x))).double()
            # the top principal directions of what the tiers miss (eigh: ascending eigenvalues)
            self.basis = torch.linalg.eigh(residual.T @ residual).eigenvectors[:, -self.rank :].float()
        return scores

    def _check_calibrated(self) -> None:
        if self.base_channels.numel() == 0:
            raise ValueError("ProtectedChannels has no channel tiers yet: call calibrate(x) first")

    def _tiers(self, x: torch.Tensor) -> tuple:
        exact = x[..., self.exact_channels].to(torch.float16)
        if not torch.isfinite(exact).all():
            raise ValueError(
                f"ProtectedChannels: an exact channel ({x[..., self.exact_channels].abs().max().item():.4g}) "
                "overflows float16"
            )
        high = self.high_codec.quantize(x[..., self.high_channels]) if self.high_codec else None
        return exact, high, self.base_codec.quantize(x[..., self.base_channels])

    def _tiers_decoded(self, tiers: tuple) -> torch.Tensor:
        exact, high, base = tiers
        out = torch.empty(*base.shape, self.dim, device=self.basis.device)
        out[..., self.exact_channels] = exact.float()
        if high is not None:
            out[..., self.high_channels] = self.high_codec.dequantize(high)
        out[..., self.base_channels] = self.base_codec.dequantize(base)
        return out

    def quantize(self, x: torch.Tensor) -> ProtectedCode:
        self._check_calibrated()
        x = check_input(x, self.dim, self.basis.device, "ProtectedChannels")
        tiers = self._tiers(x)
        coefficients = (x - self._tiers_decoded(tiers)) @ self.basis
        residual = coefficients.to(torch.float16)
        if not torch.isfinite(residual).all():
            raise ValueError(
                f"ProtectedChannels: a residual coefficient ({coefficients.abs().max().item():.4g}) overflows "
                "its float16 storage; scale the vectors down or use rank=0"
            )
        return ProtectedCode(tuple(x.shape[:-1]), self.dim, *tiers, residual)

    def dequantize(self, code: ProtectedCode) -> torch.Tensor:
        return self._tiers_decoded((code.exact, code.high, code.base)) + code.residual.float() @ self.basis.T

    def score(self, queries: torch.Tensor, code: ProtectedCode) -> torch.Tensor:
        q = check_input(queries, self.dim, self.basis.device, "ProtectedChannels.score")
        return q @ self.dequantize(code).transpose(-1, -2)

    def constant_nbytes(self) -> int:
        return buffer_nbytes(self)
