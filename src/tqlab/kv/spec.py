"""KVQuantSpec: what a compressed KV cache is, per side (keys, values), as frozen and validated data.

A spec is built once — from a Hydra config by `tqlab.config.kv_spec`, or in a notebook with
`KVQuantSpec.create(...)` — and validated as a whole before any compute: codec × bits × rotation, options,
fractional bits, head_dim, and fitted rotations (their bits, codec, model and sides must match). The
builder (`tqlab.kv.builder`) turns it into codecs; result rows take their labels from `columns()`, which
describe exactly what the builder builds. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

from .. import registry
from ..registry import RuleError

DEFAULT_ROTATION = (
    "random_haar"  # conf/common/run.yaml's: a rotation left at it is not one the user asked for
)


@dataclasses.dataclass(frozen=True)
class FittedRotations:
    """A train run's rotation file, read from its safetensors header (no torch, nothing unpickled)."""

    path: str
    sha256: str
    facts: dict = dataclasses.field(hash=False, compare=False)

    @classmethod
    def read(cls, path: str | Path) -> FittedRotations:
        path = Path(path)
        try:
            raw = path.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            facts = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["tqlab"])
        except Exception as err:
            raise RuleError(f"{path} is not a readable tqlab rotation file ({err}); re-run train.py") from err
        return cls(str(path), hashlib.sha256(raw).hexdigest(), facts)

    def sides(self) -> set[str]:
        return {unit.split("_")[0] for unit in self.facts["units"]}

    @property
    def fit(self) -> str:
        """What distinguishes this fit from others of the same rotation, its seed aside."""
        options = self.facts.get("rotation_options", {})
        parts = [self.facts.get("objective", "?")] + [
            f"{k}={v}" for k, v in sorted(options.items()) if k != "view"
        ]
        return ", ".join(parts + (["per head"] if self.facts.get("per_head") else []))

    @property
    def seed(self) -> int | None:
        return (self.facts.get("config") or {}).get("seed")

    @property
    def config_hash(self) -> str | None:
        """A short hash of the train run's configuration but its seed and what cannot change a fit (logging,
        paths): fits that differ in anything else (learning rate, epochs, data, ...) are never one
        configuration's seeds in a report."""
        from ..runs import numeric_settings

        config = self.facts.get("config")
        if config is None:
            return None
        kept = numeric_settings(config)  # what the results fingerprint hashes, the seed aside
        kept.pop("seed", None)
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def model(self) -> str | None:
        return self.facts.get("model") or (self.facts.get("config") or {}).get("model", {}).get(
            "name_or_path"
        )


@dataclasses.dataclass(frozen=True)
class RotationSpec:
    name: str
    options: tuple = ()  # sorted (option, value) pairs, defaults filled in
    fitted: FittedRotations | None = None  # parameters come from a train run

    @property
    def label(self) -> str:
        return ("fitted:" if self.fitted else "") + self.name

    @property
    def view(self) -> str | None:
        return dict(self.options).get("view")


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    name: str
    bits: int | float
    options: tuple = ()  # sorted (option, value) pairs, defaults filled in

    @property
    def stage1_bits(self) -> int:
        return registry.stage1_bits(self.name, int(self.bits))


@dataclasses.dataclass(frozen=True)
class SideSpec:
    codec: CodecSpec
    rotation: RotationSpec


@dataclasses.dataclass(frozen=True)
class KVQuantSpec:
    key: SideSpec | None
    value: SideSpec | None
    seed: int = 0

    def sides(self) -> dict[str, SideSpec]:
        return {s: getattr(self, s) for s in registry.SIDES if getattr(self, s) is not None}

    def needs_calibration(self) -> bool:
        """Whether building a codec needs train-split vectors: fractional bits (outlier channels), mean
        removal (`center`), the query metric (`key_metric=query`), a codec fitted on data (transform coding)
        or a rotation fitted from statistics (eigen_hadamard) that no fitted artefact supplies."""
        return any(
            registry.splits_outliers(s.codec.name, s.codec.bits)
            or registry.codec_rule(s.codec.name).calibrated
            or (registry.rotation_is_data_aware(s.rotation.name) and s.rotation.fitted is None)
            or dict(s.codec.options).get("center")
            or dict(s.codec.options).get("key_metric") == "query"
            for s in self.sides().values()
        )

    @classmethod
    def create(
        cls,
        codec: str = "turboquant_mse",
        bits: float = 3,
        rotation: str = "random_haar",
        *,
        compress: tuple = registry.SIDES,
        k_bits: float | None = None,
        v_bits: float | None = None,
        k_codec: str | None = None,
        v_codec: str | None = None,
        codec_options: dict | None = None,
        rotation_options: dict | None = None,
        fitted: FittedRotations | str | Path | None = None,
        model: str | None = None,
        head_dim: int | None = None,
        seed: int = 0,
    ) -> KVQuantSpec:
        """Validate everything together; errors name the config key (bits, k_bits, codec.x, rotation, …).

        k_codec / v_codec: another codec for one side (asymmetric lanes, e.g. int8 keys with TurboQuant
        values), with that codec's default options; it takes `rotation` if it accepts rotations and none
        otherwise (int8_block). `codec_options` belong to `codec`'s sides."""
        if (
            not compress
            or any(s not in registry.SIDES for s in compress)
            or len(set(compress)) != len(compress)
        ):
            raise RuleError(
                f"kv.compress={list(compress)} must be a non-empty subset of {list(registry.SIDES)}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise RuleError(f"seed={seed!r} must be an integer in 0..2^32 − 1 (a random generator's seed)")
        if head_dim is not None and (
            isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 8
        ):
            raise RuleError(f"head_dim={head_dim!r} must be an integer >= 8")
        side_codecs = {"key": k_codec or codec, "value": v_codec or codec}
        for key, name in (("k_codec", k_codec), ("v_codec", v_codec)):
            if name is not None and name not in registry.CODECS:
                raise RuleError(f"{key}={name!r} is not a codec; choose from {sorted(registry.CODECS)}")
        for key, value, side in (
            ("k_bits", k_bits, "key"),
            ("v_bits", v_bits, "value"),
            ("k_codec", k_codec, "key"),
            ("v_codec", v_codec, "value"),
        ):
            if value is not None and side not in compress:
                raise RuleError(
                    f"{key}={value} is set but kv.compress={list(compress)} keeps the {side}s exact"
                )
        options = registry.codec_options(codec, codec_options or {})
        if options.get("norm_correction") and options.get("unbiased"):
            raise RuleError(
                "codec.norm_correction=true and codec.unbiased=true are two rescalings of the decoded vector; "
                "set one of them"
            )
        rot_options = registry.rotation_options(rotation, rotation_options or {})
        if isinstance(fitted, (str, Path)):
            fitted = FittedRotations.read(fitted)
        sides = {}
        for side, override, key in (("key", k_bits, "k_bits"), ("value", v_bits, "v_bits")):
            if side not in compress:
                continue
            if side not in registry.codec_rule(side_codecs[side]).sides:
                raise RuleError(
                    f"codec={side_codecs[side]} codes only {list(registry.codec_rule(side_codecs[side]).sides)}; "
                    f"kv.compress={list(compress)} includes the {side}s (use kv=key_only, or v_codec=...)"
                )
            own = side_codecs[side] != codec  # a side with its own codec takes its defaults
            side_options = registry.codec_options(side_codecs[side], {}) if own else options
            codec_name = side_codecs[side]
            bits_key, width = (key, override) if override is not None else ("bits", bits)
            if own and override is None:
                try:
                    width = registry.check_bits(codec_name, width, bits_key, head_dim)
                except RuleError as err:
                    raise RuleError(
                        f"{key[0]}_codec={codec_name} does not take bits={bits}; set {key}: "
                        f"{registry.codec_rule(codec_name).allowed_bits()}"
                    ) from err
            width = registry.check_bits(codec_name, width, bits_key, head_dim)
            high = side_options.get("high_bits")  # a tier of channels above the base bits
            if high is not None and high <= width:
                raise RuleError(
                    f"{key[0]}_codec={codec_name} runs with its default high_bits={high}, which must exceed "
                    f"{bits_key}={width}"
                    if own
                    else f"codec.high_bits={high} must exceed {bits_key}={width}"
                )
            rot = RotationSpec(rotation, tuple(sorted(rot_options.items())))
            if own and registry.codec_rule(codec_name).rotations == ("identity",):
                rot = RotationSpec("identity", ())  # a side codec that takes no rotation gets none
            if fitted is not None and side in fitted.sides():
                rot = _fitted_rotation(
                    fitted, side, codec_name, width, bits_key, model, side_options.get("center", False)
                )
            registry.check_codec_rotation(codec_name, rot.name)
            if (
                registry.rotation_is_learned(rot.name)
                and rot.fitted is None
                and not float(width).is_integer()
            ):
                raise RuleError(f"{bits_key}={width}: learned rotations are fitted at integer bits")
            if registry.rotation_is_data_aware(rot.name) and registry.splits_outliers(codec_name, width):
                raise RuleError(
                    f"{bits_key}={width}: rotation={rot.name} is fitted on a head's statistics, which an "
                    "outlier-channel split (fractional bits) does not keep whole; use integer bits"
                )
            sides[side] = SideSpec(CodecSpec(codec_name, width, tuple(sorted(side_options.items()))), rot)
        # options given to `codec` that no side reads would be dropped without a word
        defaults = registry.codec_options(codec, {})
        changed = sorted(k for k, v in options.items() if defaults.get(k) != v)
        readers = [side for side in sides if side_codecs[side] == codec]
        if changed and not readers:
            raise RuleError(
                f"codec.{changed[0]}={options[changed[0]]!r} belongs to codec={codec}, which no compressed side uses "
                f"(k_codec={k_codec}, v_codec={v_codec}, kv.compress={list(compress)}); drop it or use that codec"
            )
        # likewise a rotation that every side replaces (by fitted rotations, or identity for a codec that takes
        # none), unless it is the configs' default
        asked = (rotation, tuple(sorted(rot_options.items())))
        default = (DEFAULT_ROTATION, tuple(sorted(registry.rotation_options(DEFAULT_ROTATION, {}).items())))
        if (
            sides
            and asked != default
            and asked not in {(s.rotation.name, s.rotation.options) for s in sides.values()}
        ):
            built = ", ".join(f"{side}s {s.rotation.label}" for side, s in sides.items())
            raise RuleError(
                f"rotation={rotation} (with its options) is used by no compressed side ({built}): fitted "
                "rotations (rotations=) and codecs that take no rotation replace it; drop it"
            )
        if options.get("key_metric") == "query" and "key" not in readers:
            raise RuleError(
                f"codec.key_metric=query weights the keys' errors by the queries, but codec={codec} codes no keys "
                f"here (kv.compress={list(compress)}, k_codec={k_codec})"
            )
        if fitted is not None and not set(sides) & fitted.sides():
            raise RuleError(
                f"rotations={fitted.path} fitted {sorted(fitted.sides())} rotations but kv.compress="
                f"{list(compress)}: nothing would use them"
            )
        spec = cls(sides.get("key"), sides.get("value"), seed)
        if head_dim is not None:
            spec.check_head_dim(head_dim)
        return spec

    def check_head_dim(self, head_dim: int) -> None:
        """What needs the model's head_dim (known after loading for models that are not offline)."""
        for side, s in self.sides().items():
            registry.check_bits(s.codec.name, s.codec.bits, "bits", head_dim)
            if s.codec.name == "protected_channels":
                o = dict(s.codec.options)
                if o["exact_groups"] + o["high_groups"] >= head_dim // 8:
                    raise RuleError(
                        f"codec.exact_groups={o['exact_groups']} + codec.high_groups={o['high_groups']} must "
                        f"leave one of head_dim {head_dim}'s {head_dim // 8} groups of 8 channels at bits="
                        f"{s.codec.bits}"
                    )
            if registry.splits_outliers(s.codec.name, s.codec.bits):  # each channel group rotated alone
                outliers = 8 * round((s.codec.bits - int(s.codec.bits)) * head_dim / 8)
                for group in (outliers, head_dim - outliers):
                    registry.check_rotation_dim(s.rotation.name, group)
            registry.check_codec_dim(s.codec.name, dict(s.codec.options), head_dim, side)
            registry.check_rotation_dim(s.rotation.name, head_dim)
            if s.rotation.fitted and s.rotation.fitted.facts["dim"] != head_dim:
                raise RuleError(
                    f"rotations={s.rotation.fitted.path} were fitted for head_dim "
                    f"{s.rotation.fitted.facts['dim']}, this model has {head_dim}"
                )

    def columns(self) -> dict:
        """The configuration columns of every result row: what was built, side by side."""
        sides = self.sides()
        first = next(iter(sides.values()))
        fitted = {s.rotation.fitted for s in sides.values() if s.rotation.fitted}
        artefact = fitted.pop() if fitted else None
        codecs = {s.codec.name for s in sides.values()}
        views = {s.rotation.view for s in sides.values()}
        options = {  # every option of a side (the view has its own column where the sides share it)
            side: {
                **dict(s.codec.options),
                **{k: v for k, v in s.rotation.options if k != "view" or len(views) > 1},
            }
            for side, s in sides.items()
        }
        shared = len({json.dumps(o, sort_keys=True) for o in options.values()}) == 1 and len(codecs) == 1
        return {  # one codec: its name; asymmetric lanes: each side's, e.g. "K int8_block, V turboquant_mse"
            "codec": first.codec.name
            if len(codecs) == 1
            else ", ".join(f"{side[0].upper()} {s.codec.name}" for side, s in sides.items()),
            "kv": "+".join(sides),
            "k_bits": self.key.codec.bits if self.key else None,
            "v_bits": self.value.codec.bits if self.value else None,
            "k_rotation": self.key.rotation.label if self.key else None,
            "v_rotation": self.value.rotation.label if self.value else None,
            "view": first.rotation.view,
            # every other option, so that two runs differing only in one never share a label silently: one set
            # where the sides agree, else each side's
            "options": json.dumps(options[next(iter(options))] if shared else options, sort_keys=True),
            "rotations_from": artefact.path if artefact else None,
            "fit": artefact.fit if artefact else None,
            "fit_seed": artefact.seed if artefact else None,
            "fit_config": artefact.config_hash if artefact else None,
            "seed": self.seed,
        }


def _fitted_rotation(
    fitted: FittedRotations, side: str, codec: str, bits, bits_key: str, model, center: bool
) -> RotationSpec:
    facts = fitted.facts
    where = f"rotations={fitted.path}"
    if registry.codec_rule(codec).rotations is not None:
        raise RuleError(
            f"{where} holds fitted rotations, but codec={codec} takes no rotation; use a turboquant codec"
        )
    if facts.get("codec") != codec:
        raise RuleError(f"{where} were fitted for codec={facts.get('codec')}; this run has codec={codec}")
    fit_bits = (facts.get("bits") or {}).get(side)
    if bits != fit_bits:
        raise RuleError(
            f"{where} were fitted at {side} bits={fit_bits}; {bits_key}={bits} would evaluate them at other "
            f"bits. Set {bits_key}={fit_bits}, or fit again at {bits}"
        )
    fit_center = (facts.get("center") or {}).get(side, False)
    if center != fit_center:
        raise RuleError(
            f"{where} were fitted with codec.center={str(fit_center).lower()} on the {side}s; set "
            f"codec.center={str(fit_center).lower()} to evaluate them as they were fitted"
        )
    if model is not None and fitted.model is not None and fitted.model != model:
        raise RuleError(f"{where} were fitted on model {fitted.model}; this run has model {model}")
    options = tuple(sorted(facts.get("rotation_options", {}).items()))
    return RotationSpec(facts["rotation"], options, fitted)
