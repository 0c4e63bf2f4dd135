"""Relevance-gated key bits ("multiscreen", made causal): each key gets high or low bits by a gate computed when
it is written, from the key itself, its position and per-head constants of the train split — never from the
queries or keys that come after it.

gate="relevance": r_t = max(cos(q̄, k_t) − trim, 0)² · h / (h + t), q̄ the head's mean train-split query (the
direction most queries point in; trim-and-square keeps only clearly aligned keys), t the key's position along
the token axis (0 first) and h = `half_life` tokens (None: no positional damping; with it early keys, which
every later query can see, are favoured). Keys with r_t above a threshold fixed on the train split — the
(1 − share) quantile of r over its keys, undamped — get `high_bits`, the others `bits`. gate="random": the
same share drawn per position from the seed (the control). Per vector: one flag bit (packed), and the key's
TurboQuant-MSE code at its tier's width with its norm; both tiers share one rotation. `quantize(x, start)` takes
the position of x's first token; the cache passes it for every chunk it codes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from .codes import Code, buffer_nbytes, check_input
from .mse import TurboQuantMSE, build_rotation

GROUP = 8  # tokens per flag byte; a cache appends gated keys a whole group at a time


@dataclasses.dataclass
class GatedCode(Code):
    """Keys [*lead, T] in two tiers. Flag bit j of byte g says whether token 8g + j has high bits. Each tier's
    tokens are stored in (group, *lead, position in group) order, so appending whole groups of tokens appends
    to both tiers and leaves every stored token where it was (what `concat` and `drop_front` rely on)."""

    flags: torch.Tensor  # uint8 [*lead, ceil(T / 8)]
    high: Code  # the high-tier tokens, shape (n_high,)
    low: Code  # the low-tier tokens, shape (n_low,)
    group: ClassVar[int] = GROUP
    grouped_token_fields: ClassVar[tuple[str, ...]] = ("flags",)

    def concat(self, other: GatedCode) -> GatedCode:
        if self.shape[-1] % GROUP:
            raise ValueError(
                f"cannot append to gated keys of {self.shape[-1]} tokens: not whole groups of {GROUP}"
            )
        return dataclasses.replace(
            self,
            shape=(*self.shape[:-1], self.shape[-1] + other.shape[-1]),
            flags=torch.cat([self.flags, other.flags], dim=-1),
            high=_cat_flat(self.high, other.high),
            low=_cat_flat(self.low, other.low),
        )

    def drop_front(self, n: int) -> GatedCode:
        """Without the first n tokens (whole groups), copied."""
        if n % GROUP:
            raise ValueError(f"cannot drop {n} tokens from gated keys: whole groups of {GROUP} only")
        dropped = _unpack(self.flags[..., : n // GROUP], n)
        n_high = int(dropped.sum())
        n_low = dropped.numel() - n_high
        return dataclasses.replace(
            self,
            shape=(*self.shape[:-1], self.shape[-1] - n),
            flags=self.flags[..., n // GROUP :].clone(),
            high=_drop_flat(self.high, n_high),
            low=_drop_flat(self.low, n_low),
        )


def _cat_flat(a: Code, b: Code) -> Code:
    tensors = {f.name: torch.cat([getattr(a, f.name), getattr(b, f.name)]) for f in _tensor_fields(a)}
    return dataclasses.replace(a, shape=(a.shape[0] + b.shape[0],), **tensors)


def _drop_flat(a: Code, n: int) -> Code:
    tensors = {f.name: getattr(a, f.name)[n:].clone() for f in _tensor_fields(a)}
    return dataclasses.replace(a, shape=(a.shape[0] - n,), **tensors)


def _tensor_fields(code: Code) -> list:
    return [f for f in dataclasses.fields(code) if isinstance(getattr(code, f.name), torch.Tensor)]


def _unpack(flags: torch.Tensor, tokens: int) -> torch.Tensor:
    bits = (flags.unsqueeze(-1) >> torch.arange(GROUP, device=flags.device, dtype=torch.uint8)) & 1
    return bits.flatten(-2)[..., :tokens].bool()


def _by_group(t: torch.Tensor, token_axis: int) -> torch.Tensor:
    """[*lead, T, ...] → [G, *lead, 8, ...], T padded to G·8 with zeros (False): the order the tiers store."""
    axis = t.dim() + token_axis
    pad = -t.shape[axis] % GROUP
    if pad:
        t = torch.cat([t, t.new_zeros(*t.shape[:axis], pad, *t.shape[axis + 1 :])], dim=axis)
    return t.unflatten(axis, (-1, GROUP)).movedim(axis, 0)


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
        self.token_group = GROUP  # a cache encodes whole groups of 8 keys (their flags fill a byte)
        self.positional = True  # quantize takes the position of the first key (`start`)
        rot = build_rotation(rotation, dim, seed, {})
        self.low = TurboQuantMSE(dim, bits, rot, norm_dtype=norm_dtype)
        self.high = TurboQuantMSE(dim, high_bits, rot, norm_dtype=norm_dtype)
        self.register_buffer("query_direction", torch.zeros(dim))
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def relevance(self, keys: torch.Tensor, damped: bool = True, start: int = 0) -> torch.Tensor:
        """r_t for keys [..., T, dim] in token order, the first at position `start`."""
        cos = (keys @ self.query_direction) / keys.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        cos = cos.clamp(-1, 1)  # fp32 round-off puts a key along q̄ a few ulps past 1
        r = (cos - self.trim).clamp_min(0) ** 2
        if damped and self.half_life:
            t = start + torch.arange(keys.shape[-2], device=keys.device, dtype=r.dtype)
            r = r * self.half_life / (self.half_life + t)
        return r

    def calibrate(self, keys: torch.Tensor, queries: torch.Tensor) -> None:
        """q̄ from the unit's train-split queries, the threshold from its keys (undamped: positions unknown)."""
        keys = check_input(keys, self.dim, self.threshold.device, "RelevanceGated.calibrate").reshape(
            -1, self.dim
        )
        q = check_input(queries, self.dim, self.threshold.device, "RelevanceGated.calibrate").reshape(
            -1, self.dim
        )
        mean = q.mean(0)
        self.query_direction = mean / mean.norm().clamp_min(torch.finfo(torch.float32).tiny)
        self.threshold = torch.quantile(self.relevance(keys, damped=False).double(), 1 - self.share).float()

    def flags(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[..., T] bool: which keys get high bits — each from its own key and position (start + t) only."""
        if self.gate == "random":
            t = start + torch.arange(x.shape[-2])
            g = torch.Generator().manual_seed(self.seed)
            draws = torch.rand(max(int(t.max()) + 1, 1), generator=g)[t]  # position t's draw, whatever T is
            return (draws < self.share).to(x.device).expand(x.shape[:-1])
        if torch.isnan(self.threshold):
            raise ValueError("RelevanceGated has no threshold yet: call calibrate(keys, queries) first")
        return self.relevance(x, start=start) > self.threshold

    def quantize(self, x: torch.Tensor, start: int = 0) -> GatedCode:
        """Code keys x [..., T, dim] whose first sits at position `start` of its sequence (the cache passes how
        many tokens came before; the gate's damping and the random control depend on it)."""
        x = check_input(x, self.dim, self.threshold.device, "RelevanceGated")
        if x.dim() < 2:
            raise ValueError("RelevanceGated codes keys along a token axis: x must be [..., T, dim]")
        high = self.flags(x, start)  # [*lead, T]
        grouped_high = _by_group(high, -1)  # [G, *lead, 8]
        grouped_valid = _by_group(torch.ones_like(high), -1)
        grouped_x = _by_group(x, -2)
        bits = grouped_high.movedim(0, -2).to(torch.uint8)  # [*lead, G, 8]
        flags = (bits << torch.arange(GROUP, device=x.device, dtype=torch.uint8)).sum(-1)
        return GatedCode(
            tuple(x.shape[:-1]),
            self.dim,
            flags.to(torch.uint8),
            self.high.quantize(grouped_x[grouped_high]),
            self.low.quantize(grouped_x[grouped_valid & ~grouped_high]),
        )

    def dequantize(self, code: GatedCode) -> torch.Tensor:
        tokens = code.shape[-1]
        high = _unpack(code.flags, tokens)
        grouped_high = _by_group(high, -1)
        grouped_valid = _by_group(torch.ones_like(high), -1)
        out = torch.zeros(*grouped_high.shape, self.dim, device=self.threshold.device)
        out[grouped_high] = self.high.dequantize(code.high)
        out[grouped_valid & ~grouped_high] = self.low.dequantize(code.low)
        return out.movedim(0, -3).flatten(-3, -2)[..., :tokens, :]

    def score(self, queries: torch.Tensor, code: GatedCode) -> torch.Tensor:
        q = check_input(queries, self.dim, self.threshold.device, "RelevanceGated.score")
        return q @ self.dequantize(code).transpose(-1, -2)

    def constant_nbytes(self) -> int:
        return buffer_nbytes(self)  # the shared rotation once: buffers() skips duplicates
