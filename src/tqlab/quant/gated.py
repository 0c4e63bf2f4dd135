"""Relevance-gated key bits ("multiscreen", made causal): each key gets high or low bits by a gate computed when
it is written, from the key itself, its position and per-head constants of the train split — never from the
queries or keys that come after it.

gate="relevance": r_t = max(cos(q̄, k_t) − trim, 0)² · h / (h + t), q̄ the head's mean train-split query (the
direction most queries point in; trim-and-square keeps only clearly aligned keys), t the key's position along
the token axis (0 first) and h = `half_life` tokens (None: no positional damping; with it early keys, which
every later query can see, are favoured). Keys with r_t above a threshold fixed on the train split — the
(1 − share) quantile of r over its keys, undamped — get `high_bits`, the others `bits`. gate="random": the
same share drawn per position from the seed (the control). Per vector: one flag bit (packed), and the key's
TurboQuant-MSE code at its tier's width with its norm; both tiers share one rotation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .codes import Code, buffer_nbytes, check_input
from .mse import TurboQuantMSE, build_rotation


@dataclasses.dataclass
class GatedCode(Code):
    flags: torch.Tensor  # uint8 [*shape[:-1], ceil(T / 8)]: bit t of the token axis set = high tier
    high: Code  # the high-tier tokens in token order (flattened over the leading axes)
    low: Code


class RelevanceGated(nn.Module):
    def __init__(
        self,
        dim: int,
        bits: int,
        high_bits: int = 4,
        share: float = 0.25,
        trim: float = 0.0,
        half_life: int | None = None,
        gate: str = "relevance",
        rotation="random_haar",
        seed: int = 0,
        norm_dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        if not bits < high_bits <= 8 or not 0 < share < 1 or gate not in ("relevance", "random"):
            raise ValueError(
                f"RelevanceGated: high_bits={high_bits} must exceed bits={bits}, share={share} lie in (0, 1), "
                f"gate={gate!r} be relevance or random"
            )
        self.dim, self.bits, self.high_bits, self.share, self.trim = dim, bits, high_bits, share, trim
        self.half_life, self.gate, self.seed = half_life, gate, seed
        rot = build_rotation(rotation, dim, seed, {})
        self.low = TurboQuantMSE(dim, bits, rot, norm_dtype=norm_dtype)
        self.high = TurboQuantMSE(dim, high_bits, rot, norm_dtype=norm_dtype)
        self.register_buffer("query_direction", torch.zeros(dim))
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def relevance(self, keys: torch.Tensor, damped: bool = True) -> torch.Tensor:
        """r_t for keys [..., T, dim] in token order from position 0."""
        cos = (keys @ self.query_direction) / keys.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        r = (cos - self.trim).clamp_min(0) ** 2
        if damped and self.half_life:
            t = torch.arange(keys.shape[-2], device=keys.device, dtype=r.dtype)
            r = r * self.half_life / (self.half_life + t)
        return r

    def calibrate(self, keys: torch.Tensor, queries: torch.Tensor) -> None:
        """q̄ from the unit's train-split queries, the threshold from its keys (undamped: positions unknown)."""
        keys = check_input(keys, self.dim, self.threshold.device, "RelevanceGated.calibrate").reshape(
            -1, self.dim
        )
        q = queries.float().reshape(-1, self.dim).to(self.threshold.device)
        mean = q.mean(0)
        self.query_direction = mean / mean.norm().clamp_min(torch.finfo(torch.float32).tiny)
        self.threshold = torch.quantile(self.relevance(keys, damped=False).double(), 1 - self.share).float()

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T] bool: which keys get high bits — each from its own key and position only."""
        if self.gate == "random":
            t = torch.arange(x.shape[-2])
            g = torch.Generator().manual_seed(self.seed)
            draws = torch.rand(max(int(t.max()) + 1, 1), generator=g)[t]  # position t's draw, whatever T is
            return (draws < self.share).to(x.device).expand(x.shape[:-1])
        if torch.isnan(self.threshold):
            raise ValueError("RelevanceGated has no threshold yet: call calibrate(keys, queries) first")
        return self.relevance(x) > self.threshold

    def quantize(self, x: torch.Tensor) -> GatedCode:
        x = check_input(x, self.dim, self.threshold.device, "RelevanceGated")
        if x.dim() < 2:
            raise ValueError("RelevanceGated codes keys along a token axis: x must be [..., T, dim]")
        high = self.flags(x)
        packed = torch.nn.functional.pad(high, (0, -high.shape[-1] % 8)).unflatten(-1, (-1, 8))
        flags = (packed.to(torch.uint8) << torch.arange(8, device=x.device, dtype=torch.uint8)).sum(-1)
        return GatedCode(
            tuple(x.shape[:-1]),
            self.dim,
            flags.to(torch.uint8),
            self.high.quantize(x[high]),
            self.low.quantize(x[~high]),
        )

    def _unpacked(self, code: GatedCode) -> torch.Tensor:
        bits = (code.flags.unsqueeze(-1) >> torch.arange(8, device=code.flags.device, dtype=torch.uint8)) & 1
        return bits.flatten(-2)[..., : code.shape[-1]].bool()

    def dequantize(self, code: GatedCode) -> torch.Tensor:
        high = self._unpacked(code)
        out = torch.empty(*code.shape, self.dim, device=self.threshold.device)
        out[high] = self.high.dequantize(code.high)
        out[~high] = self.low.dequantize(code.low)
        return out

    def score(self, queries: torch.Tensor, code: GatedCode) -> torch.Tensor:
        q = check_input(queries, self.dim, self.threshold.device, "RelevanceGated.score")
        return q @ self.dequantize(code).transpose(-1, -2)

    def constant_nbytes(self) -> int:
        return buffer_nbytes(self)  # the shared rotation once: buffers() skips duplicates
