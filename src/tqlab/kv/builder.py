"""The one builder: a KVQuantSpec + the model's head_dim (+ fitted rotations, calibration data) → the codec
of every (side, layer, KV head). Evaluation, training and the cache all build through here."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import registry
from ..dtypes import DTYPES
from ..quant import (
    Centered,
    MixedPrecision,
    ProtectedChannels,
    QueryWeighted,
    RelevanceGated,
    TransformCoder,
    make_codec,
    query_metric_maps,
)
from ..registry import RuleError
from ..rotation import Composed, EigenHadamard, Rotation, make_rotation
from ..rotation.io import load_rotations, rotation_for, unit_name
from .spec import KVQuantSpec, SideSpec


def unit_seed(seed: int, side: str, layer: int, head: int | None) -> int:
    """Each (side, layer, KV head) gets its own random rotation and sketch, reproducibly from one seed."""
    return seed * 100_003 + (0 if side == "key" else 10_007) + layer * 101 + (head or 0)


def make_side_rotation(side_spec: SideSpec, dim: int, seed: int) -> Rotation:
    """A fresh (unfitted) rotation of the side's configured kind."""
    return make_rotation(side_spec.rotation.name, dim, seed=seed, **dict(side_spec.rotation.options))


def fit_rotations(
    spec: KVQuantSpec,
    layers: list[int],
    num_kv_heads: int,
    dim: int,
    per_head: bool,
    calibration: Callable[[str, int, int], torch.Tensor] | None = None,
    means: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Fresh rotations to fit, one per (side, layer) or per (side, layer, KV head), named by `unit_name`;
    their data-aware parts (eigen_hadamard) set from `calibration` (a per-layer unit: all its heads), around
    the units' `means` (`fit_means`) where the codec is centred."""
    spec.check_head_dim(dim)
    means = means or {}
    rotations = {}
    for side, s in spec.sides().items():
        for layer in layers:
            for head in range(num_kv_heads) if per_head else [None]:
                unit = unit_name(layer, head, side)
                rotation = make_side_rotation(s, dim, unit_seed(spec.seed, side, layer, head))
                for part in _parts(rotation):
                    if isinstance(part, EigenHadamard):
                        if part.basis == "query":
                            part.fit(_unit_vectors(calibration, "query", layer, head, num_kv_heads))
                        else:  # what the codec sees: around the unit's mean under codec.center
                            seen = _unit_vectors(calibration, side, layer, head, num_kv_heads)
                            part.fit(seen - means[unit] if unit in means else seen)
                rotations[unit] = rotation
    return rotations


def fit_means(
    spec: KVQuantSpec,
    layers: list[int],
    num_kv_heads: int,
    per_head: bool,
    calibration: Callable[[str, int, int], torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Per fitted unit of a side with `codec.center`, the train mean its codec codes around (a per-layer
    unit: over all its heads)."""
    means = {}
    for side, s in spec.sides().items():
        if not dict(s.codec.options).get("center"):
            continue
        for layer in layers:
            for head in range(num_kv_heads) if per_head else [None]:
                vectors = _unit_vectors(calibration, side, layer, head, num_kv_heads)
                means[unit_name(layer, head, side)] = vectors.mean(0)
    return means


def _unit_vectors(calibration, side: str, layer: int, head: int | None, num_kv_heads: int) -> torch.Tensor:
    """A fitted unit's calibration vectors: its head's, or every head's for a per-layer unit."""
    heads = range(num_kv_heads) if head is None else [head]
    return torch.cat([calibration(side, layer, h).float() for h in heads])


def load_fitted(spec: KVQuantSpec) -> dict[str, Rotation]:
    """The fitted rotations the spec names, checked to be the file the spec was validated against."""
    fitted = {s.rotation.fitted for s in spec.sides().values() if s.rotation.fitted}
    if not fitted:
        return {}
    (artefact,) = fitted
    rotations, _ = load_rotations(artefact.path)
    from ..capture.models import sha256_file

    if sha256_file(artefact.path) != artefact.sha256:
        raise RuleError(f"{artefact.path} changed after the run was configured; start the run again")
    return rotations


def _parts(rotation) -> list:
    if isinstance(rotation, Composed):
        return list(rotation.parts)
    return [rotation] if isinstance(rotation, Rotation) else []


class CodecBank:
    """Codecs built on first use and kept: one per (side, layer, KV head), with a seed of its own, the
    fitted rotation where the spec names one, and — for fractional bits — an outlier-channel set
    calibrated by `calibration(side, layer, head)` (train-split vectors)."""

    def __init__(
        self,
        spec: KVQuantSpec,
        dim: int,
        calibration: Callable[[str, int, int], torch.Tensor] | None = None,
    ):
        spec.check_head_dim(dim)
        if calibration is None and spec.needs_calibration():
            raise RuleError(
                "fractional bits, codec.center, the query metric, transform coding and data-aware rotations "
                "fit per-head statistics on calibration vectors: pass "
                "calibration=fn(side, layer, head) → [n, head_dim] train-split vectors"
            )
        self.spec, self.dim, self.calibration = spec, dim, calibration
        self.fitted = load_fitted(spec)
        self._cache: dict[tuple, torch.nn.Module] = {}

    def check_units(self, layers: list[int], num_kv_heads: int) -> None:
        """Refuse before compute when a fitted side lacks a rotation for some evaluated (layer, head)."""
        for side, s in self.spec.sides().items():
            if s.rotation.fitted is None:
                continue
            missing = [
                (layer, head)
                for layer in layers
                for head in range(num_kv_heads)
                if rotation_for(self.fitted, layer, head, side) is None
            ]
            if missing:
                raise RuleError(
                    f"rotations={s.rotation.fitted.path} has no {side} rotation for (layer, head) "
                    f"{missing[:4]}{' …' if len(missing) > 4 else ''}; evaluate the layers it was fitted on "
                    f"({s.rotation.fitted.facts.get('layers')})"
                )

    def get(self, side: str, layer: int, head: int, device) -> torch.nn.Module | None:
        """The codec of (side, layer, head), or None when that side stays exact."""
        if getattr(self.spec, side) is None:
            return None
        key = (side, layer, head)
        if key not in self._cache:
            self._cache[key] = self._build(side, layer, head).to(device)
        return self._cache[key]

    def _build(self, side: str, layer: int, head: int) -> torch.nn.Module:
        s: SideSpec = getattr(self.spec, side)
        options = dict(s.codec.options)
        seed = unit_seed(self.spec.seed, side, layer, head)
        if "norm_dtype" in options:
            options["norm_dtype"] = DTYPES[options["norm_dtype"]]
        if s.codec.name == "kivi":
            options["axis"] = "channel" if side == "key" else "token"  # KIVI's own choice per side
        if registry.codec_rule(s.codec.name).rotations != ("identity",):  # the codec takes a rotation
            if s.rotation.fitted is not None:
                options["rotation"] = rotation_for(self.fitted, layer, head, side)
            elif not registry.splits_outliers(s.codec.name, s.codec.bits):
                options["rotation"] = make_side_rotation(s, self.dim, seed)
            else:  # the outlier split builds one rotation per channel group, of that group's size
                options.update(rotation=s.rotation.name, **dict(s.rotation.options))
            options["seed"] = seed
        elif registry.codec_rule(s.codec.name).seeded:
            options["seed"] = seed
        center = options.pop("center", False)
        ranking = options.pop("ranking", None)  # protected channels: by attention weights or by energy
        query_metric = options.pop("key_metric", "euclidean") == "query" and side == "key"
        codec = make_codec(s.codec.name, self.dim, s.codec.bits, **options)
        fits = [p for p in _parts(options.get("rotation")) if isinstance(p, EigenHadamard)]
        fits = fits if s.rotation.fitted is None else []  # a fitted artefact holds its own statistics
        calibrated = isinstance(codec, (MixedPrecision, TransformCoder, ProtectedChannels, RelevanceGated))
        # the vectors as the codec sees them: centred, then mapped into the query metric
        seen = self.calibration(side, layer, head).float() if center or calibrated or fits else None
        mean = seen.mean(0) if center else None
        if center:
            seen = seen - mean
        maps = query_metric_maps(self.calibration("query", layer, head).float()) if query_metric else None
        if maps is not None and seen is not None:
            seen = seen @ maps[0]
        for part in fits:
            if part.basis == "query":
                queries = self.calibration("query", layer, head).float()
                part.fit(queries if maps is None else queries @ maps[1])
            else:
                part.fit(seen)
        if isinstance(codec, RelevanceGated):  # the gate's query direction and threshold
            codec.calibrate(seen, self.calibration("query", layer, head))
        elif ranking == "attention":  # each token weighted by Σ_q p_qt², from the unit's queries and keys
            codec.calibrate(seen, self.calibration("weights", layer, head))
        elif calibrated:  # outlier channels, the transform coder's basis and allocation, or channel tiers
            codec.calibrate(seen)
        if maps is not None:
            codec = QueryWeighted(codec, *maps)
        return Centered(codec, mean) if center else codec

    def constant_nbytes(self, units: list[tuple[int, int]], device) -> int:
        """Bytes of the per-layer constants over every (layer, KV head) unit and compressed side."""
        codecs = [self.get(s, layer, head, device) for s in self.spec.sides() for layer, head in units]
        return sum(c.constant_nbytes() for c in codecs)
