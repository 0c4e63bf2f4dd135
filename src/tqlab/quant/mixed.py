"""Fractional bits the paper's way: a fixed outlier-channel set gets one more bit.

bits = 2.5 at dim = 128 splits the channels into a fixed set of round(0.5·128/8)·8 = 64 "outlier"
channels coded by one TurboQuant instance at 3 bits and the other 64 by an independent instance at 2
bits: 2.5 payload bits per coordinate. Each instance stores its own norm (and, for Prod, residual norm),
so the effective bits are higher; `code.bits_per_coordinate` counts them. The paper's "2.5 bits" is
32 outliers at 3 bits + 96 at 2 bits (2.25 payload bits) plus two fp16 norms: `n_outlier=32`.

The channel set is a per-(layer, head) constant, chosen from calibration data by RMS magnitude
(`calibrate`) or given (`channels=`); it is stored once in the codec and reported by `constant_nbytes`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .codebook import MAX_BITS
from .codes import Code, buffer_nbytes, check_input
from .mse import TurboQuantMSE
from .prod import TurboQuantProd

_BASES = {"mse": TurboQuantMSE, "prod": TurboQuantProd}


@dataclasses.dataclass
class MixedCode(Code):
    outliers: Code  # the outlier channels, one more bit
    rest: Code


class MixedPrecision(nn.Module):
    def __init__(
        self,
        dim: int,
        bits: float,
        base: str = "mse",
        channels: torch.Tensor | list[int] | None = None,
        n_outlier: int | None = None,
        seed: int = 0,
        **codec_options,
    ):
        super().__init__()
        if base not in _BASES:
            raise ValueError(f"base={base!r} is not one of {sorted(_BASES)}")
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
            raise ValueError(f"bits={bits!r} is not a fractional bit width MixedPrecision({base}) can honour")
        low = math.floor(bits)
        lowest = 2 if base == "prod" else 1
        if isinstance(bits, bool) or not lowest <= low < MAX_BITS or bits == low:
            raise ValueError(
                f"bits={bits!r} is not a fractional bit width MixedPrecision({base}) can honour: "
                f"it takes a non-integer in ({lowest}, {MAX_BITS}); integer bits go to the plain codec"
            )
        if channels is not None:
            channels = torch.as_tensor(channels, dtype=torch.long).flatten()
            n_outlier = len(channels)
        if n_outlier is None:
            n_outlier = 8 * round((bits - low) * dim / 8)
        if not 8 <= n_outlier <= dim - 8:
            raise ValueError(
                f"n_outlier={n_outlier} leaves a group under 8 channels at dim={dim}; "
                f"it must lie in 8..{dim - 8} (bits={bits})"
            )
        self.dim, self.bits, self.base, self.n_outlier = dim, float(bits), base, int(n_outlier)
        codec = _BASES[base]
        self.outlier_codec = codec(n_outlier, low + 1, seed=seed, **codec_options)
        self.rest_codec = codec(dim - n_outlier, low, seed=seed + 1, **codec_options)
        self.register_buffer("outlier_channels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("rest_channels", torch.zeros(0, dtype=torch.long))
        if channels is not None:
            self.set_channels(channels)

    @property
    def payload_bits(self) -> float:
        return math.floor(self.bits) + self.n_outlier / self.dim

    def set_channels(self, channels: torch.Tensor) -> None:
        channels = torch.as_tensor(channels, dtype=torch.long).flatten()
        if len(channels) != self.n_outlier or len(set(channels.tolist())) != self.n_outlier:
            raise ValueError(f"channels must be {self.n_outlier} distinct indices, got {channels.tolist()}")
        if channels.min() < 0 or channels.max() >= self.dim:
            raise ValueError(f"channels must lie in 0..{self.dim - 1}, got {channels.tolist()}")
        device = self.outlier_channels.device
        mask = torch.ones(self.dim, dtype=torch.bool)
        mask[channels.cpu()] = False
        self.outlier_channels = channels.sort().values.to(device)
        self.rest_channels = mask.nonzero().flatten().to(device)

    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Pick the n_outlier channels of largest RMS over calibration vectors x [..., dim]; return them."""
        x = check_input(x, self.dim, self.outlier_channels.device, "MixedPrecision.calibrate")
        rms = x.reshape(-1, self.dim).double().pow(2).mean(0)
        self.set_channels(rms.topk(self.n_outlier).indices)
        return self.outlier_channels

    def _split(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.outlier_channels.numel() == 0:
            raise ValueError(
                "MixedPrecision has no outlier channels yet: call calibrate(x) or pass channels="
            )
        x = check_input(x, self.dim, self.outlier_channels.device, what)
        return x[..., self.outlier_channels], x[..., self.rest_channels]

    def quantize(self, x: torch.Tensor) -> MixedCode:
        hi, lo = self._split(x, "MixedPrecision")
        return MixedCode(
            tuple(x.shape[:-1]), self.dim, self.outlier_codec.quantize(hi), self.rest_codec.quantize(lo)
        )

    def dequantize(self, code: MixedCode) -> torch.Tensor:
        out = torch.empty(*code.shape, self.dim, device=self.outlier_channels.device)
        out[..., self.outlier_channels] = self.outlier_codec.dequantize(code.outliers)
        out[..., self.rest_channels] = self.rest_codec.dequantize(code.rest)
        return out

    def score(self, queries: torch.Tensor, code: MixedCode) -> torch.Tensor:
        hi, lo = self._split(queries, "MixedPrecision.score")
        return self.outlier_codec.score(hi, code.outliers) + self.rest_codec.score(lo, code.rest)

    def constant_nbytes(self) -> int:
        return buffer_nbytes(self)
