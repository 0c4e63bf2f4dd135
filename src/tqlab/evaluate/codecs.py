"""Building the codec of each (target, layer, KV head) of an evaluation from the configuration."""

from __future__ import annotations

import torch

from ..dtypes import DTYPES
from ..quant import MixedPrecision, make_codec
from ..rotation import make_rotation
from ..rotation.io import rotation_for

TURBOQUANT = ("turboquant_mse", "turboquant_prod")


class CodecBank:
    """Codecs built on first use and kept: one per (target, layer, KV head), each with its own seed
    (so layers get independent random rotations), a fitted rotation where one was trained, and — for
    fractional bits — an outlier-channel set calibrated on the train split."""

    def __init__(
        self, codec: dict, bits: dict, rotation: dict, dim: int, seed: int, fitted=None, calibration=None
    ):
        self.codec, self.bits, self.rotation, self.dim, self.seed = codec, bits, rotation, dim, seed
        self.fitted, self.calibration = fitted, calibration
        self._cache: dict[tuple, torch.nn.Module] = {}

    def get(self, target: str, layer: int, head: int, device) -> torch.nn.Module | None:
        if self.bits.get(target) is None:
            return None  # this target stays exact
        key = (target, layer, head)
        if key not in self._cache:
            self._cache[key] = self._build(target, layer, head).to(device)
        return self._cache[key]

    def _build(self, target: str, layer: int, head: int) -> torch.nn.Module:
        name = self.codec["name"]
        options = {k: v for k, v in self.codec.items() if k != "name" and v is not None}
        seed = self.seed * 100_003 + (0 if target == "key" else 10_007) + layer * 101 + head
        if "norm_dtype" in options:
            options["norm_dtype"] = DTYPES[options["norm_dtype"]]
        if name == "kivi":
            options["axis"] = "channel" if target == "key" else "token"
        if name in TURBOQUANT or name == "int4_block":
            fitted = rotation_for(self.fitted, layer, head, target) if self.fitted else None
            opts = {k: v for k, v in self.rotation.items() if k in ("view", "init") and v is not None}
            if fitted is not None:
                options["rotation"] = fitted
            elif float(self.bits[target]).is_integer():
                options["rotation"] = make_rotation(self.rotation["name"], self.dim, seed=seed, **opts)
            else:  # the outlier split builds one rotation per channel group, of that group's size
                options.update(rotation=self.rotation["name"], **opts)
            options["seed"] = seed
        codec = make_codec(name, self.dim, self.bits[target], **options)
        if isinstance(codec, MixedPrecision):
            codec.calibrate(self.calibration(target, layer, head))
        return codec

    def constant_nbytes(self, units: list[tuple[int, int]], device) -> int:
        """Bytes of the per-layer constants over every (layer, KV head) unit and compressed target."""
        codecs = [self.get(t, layer, head, device) for t in ("key", "value") for layer, head in units]
        return sum(c.constant_nbytes() for c in codecs if c is not None)
