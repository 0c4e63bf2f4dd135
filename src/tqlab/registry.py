"""The one list of codec and rotation names and their rules, read by config validation and the library alike.

Torch-free and importing nothing from tqlab, so a config is checked in milliseconds and `quant`,
`rotation` and `kv` all refuse exactly the same things. Every rule error names the key that was wrong and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import math

MAX_BITS = 8  # Lloyd-Max codebooks are solved up to 8 bits; beyond that the store is bigger than fp16 keys
VIEWS = ("vector", "spinor_plus", "spinor_minus")  # the three 8-dim representations of Spin(8)
NORM_DTYPES = ("float16", "bfloat16", "float32")  # how a TurboQuant codec stores norms (counted in bytes)
SIDES = ("key", "value")
# how a compressed cache treats the tokens of a forward call: every query sees only codes (the papers'), or
# the call's own tokens attend to themselves exactly and are stored as codes for later queries (vLLM's)
PROTOCOLS = ("all_quantized", "prefill_exact")


class RuleError(ValueError):
    """A value a rule does not allow; the message names the key and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One codec or rotation option: a choice from `values`, or a positive integer (`positive_int`)."""

    values: tuple = ()
    positive_int: bool = False
    nullable: bool = False
    default: object = None

    def allowed(self) -> str:
        if self.positive_int:
            return "a positive integer" + (" or null" if self.nullable else "")
        return str(list(self.values))

    def check(self, key: str, value) -> None:
        if value is None and self.nullable:
            return
        if self.positive_int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        else:
            ok = any(value == v and type(value) is type(v) for v in self.values)
        if not ok:
            raise RuleError(f"{key}={value!r} is not allowed; use {self.allowed()}")


def _check_options(prefix: str, given: dict, options: dict[str, Option]) -> dict:
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise RuleError(f"{prefix} takes no option(s) {unknown}; its options are {sorted(options) or 'none'}")
    out = {}
    for name, option in options.items():
        value = given.get(name, option.default)
        option.check(f"{prefix}.{name}", value)
        out[name] = value
    return out


# -- rotations ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RotationRule:
    head_dim: str = "any"  # "any" | "multiple_of_8" | "power_of_two"
    learned: bool = False  # has parameters that train.py fits
    data_aware: bool = False  # computed from a head's train-split statistics (by the builder or train.py)
    options: dict = dataclasses.field(default_factory=dict)

    def check_dim(self, name: str, dim: int) -> None:
        if self.head_dim == "multiple_of_8" and dim % 8:
            raise RuleError(f"rotation={name} needs head_dim divisible by 8; this model has {dim}")
        if self.head_dim == "power_of_two" and (dim < 4 or dim & (dim - 1)):
            raise RuleError(
                f"rotation={name} needs a power-of-two head_dim >= 4; this model has {dim}: use random_haar"
            )


ROTATIONS: dict[str, RotationRule] = {
    "identity": RotationRule(),
    "random_haar": RotationRule(),
    "fast_hadamard": RotationRule(head_dim="power_of_two"),
    "block_so8_static": RotationRule(head_dim="multiple_of_8"),
    # eigenbasis of the head's keys (or of its queries' second moment) × randomised fast Hadamard
    "eigen_hadamard": RotationRule(
        head_dim="power_of_two",
        data_aware=True,
        options={"basis": Option(("key", "query"), default="key")},
    ),
    # block-diagonal SO(8) layers between stride permutations, identity at start (rotation.butterfly)
    "so8_butterfly": RotationRule(head_dim="multiple_of_8", learned=True),
    "dense_learned": RotationRule(learned=True),  # exp(A − Aᵀ), dim² parameters, identity at start
    "block_so8_learned": RotationRule(
        head_dim="multiple_of_8",
        learned=True,
        options={
            "view": Option(VIEWS, default="vector"),
            "init": Option(("random", "identity"), default="random"),
        },
    ),
}


def rotation_parts(name: str) -> list[str]:
    """The parts of a rotation name ("a+b" composes, a first), each checked against the registry."""
    parts = str(name).split("+")
    for part in parts:
        if part not in ROTATIONS:
            raise RuleError(
                f"rotation={name!r}: {part!r} is not a rotation; choose from {sorted(ROTATIONS)} "
                "or join them with '+'"
            )
    return parts


def rotation_options(name: str, given: dict) -> dict:
    """The options of rotation `name` with defaults filled in; unknown or disallowed ones are refused."""
    options = {k: o for p in rotation_parts(name) for k, o in ROTATIONS[p].options.items()}
    return _check_options("rotation", {k: v for k, v in given.items() if v is not None}, options)


def rotation_is_learned(name: str) -> bool:
    return any(ROTATIONS[p].learned for p in rotation_parts(name))


def rotation_is_data_aware(name: str) -> bool:
    return any(ROTATIONS[p].data_aware for p in rotation_parts(name))


def check_rotation_dim(name: str, dim: int) -> None:
    for part in rotation_parts(name):
        ROTATIONS[part].check_dim(name, dim)


# -- codecs ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CodecRule:
    bits: tuple = ()  # fixed widths; empty: any width in min_bits..MAX_BITS
    min_bits: int = 1
    fractional: bool = False  # non-integer widths split a fixed outlier-channel set (quant.MixedPrecision)
    rotations: tuple | None = None  # rotations the codec accepts; None: every rotation
    stage1_offset: int = 0  # Stage-1 (MSE) bits = bits − offset: Prod spends one bit on its QJL sketch
    budget: bool = False  # any width whose product with head_dim is whole: bits per vector are allocated
    calibrated: bool = False  # built from train-split vectors of its unit (needs calibration data)
    seeded: bool = False  # draws its own random rotations (no `rotation=`): takes the unit's seed
    sides: tuple = ("key", "value")  # the sides it may code
    trainable: bool = True  # train.py can fit rotations for it
    key_groups: bool = False  # a cache encodes its keys a group of tokens at a time (the newest wait exact)
    options: dict = dataclasses.field(default_factory=dict)

    def allowed_bits(self) -> str:
        if self.bits:
            return str(list(self.bits))
        if self.budget:
            return f"a number in (0, {MAX_BITS}] whose product with head_dim is a whole number of bits"
        frac = ", or fractional in between (e.g. 2.5)" if self.fractional else ""
        return f"{self.min_bits}..{MAX_BITS}{frac}"


_TURBOQUANT_NORM = Option(NORM_DTYPES, default="float16")
# every codec may code x − μ, μ a per-(layer, KV head) mean of train-split vectors (quant.Centered), and
# keys in the metric of the head's train-split queries (quant.QueryWeighted)
_CENTER = {
    "center": Option((False, True), default=False),
    "key_metric": Option(("euclidean", "query"), default="euclidean"),
}
CODECS: dict[str, CodecRule] = {
    "turboquant_mse": CodecRule(
        fractional=True,
        options={
            **_CENTER,
            "norm_dtype": _TURBOQUANT_NORM,
            "norm_correction": Option((False, True), default=False),
            "unbiased": Option((False, True), default=False),
        },
    ),
    "turboquant_prod": CodecRule(
        min_bits=2,
        fractional=True,
        stage1_offset=1,
        options={
            **_CENTER,
            "norm_dtype": _TURBOQUANT_NORM,
            "qjl_dim": Option(positive_int=True, nullable=True),
        },
    ),
    "int8_block": CodecRule(
        bits=(8,),
        rotations=("identity",),
        options={**_CENTER, "block": Option(positive_int=True, default=32)},
    ),
    "int4_block": CodecRule(
        bits=(4,),
        rotations=("identity", "fast_hadamard"),
        options={**_CENTER, "block": Option(positive_int=True, default=32)},
    ),
    # eigenbasis + reverse water-filling + a Gaussian Lloyd-Max codebook per component (quant.TransformCoder)
    "transform_coding": CodecRule(
        budget=True,
        calibrated=True,
        rotations=("identity",),  # its eigenbasis is fitted on calibration vectors
        options={
            **_CENTER,
            "scale": Option(("norm", "none"), default="norm"),
            "norm_dtype": _TURBOQUANT_NORM,
        },
    ),
    # channel groups in tiers by sensitivity: exact / high_bits / the base bits, + a rank-r residual
    # (quant.ProtectedChannels); bits: the base tier's
    "protected_channels": CodecRule(
        bits=(1, 2, 3),
        rotations=("identity",),  # each tier has its own random rotation over its channels
        calibrated=True,
        seeded=True,
        options={
            **_CENTER,
            "exact_groups": Option(tuple(range(8)), default=1),  # groups of 8 channels
            "high_groups": Option(tuple(range(8)), default=1),
            "high_bits": Option((2, 3, 4, 5, 6, 7, 8), default=4),
            "rank": Option((0, 1, 2, 4, 8, 16), default=0),
            "ranking": Option(("attention", "energy"), default="attention"),
            "norm_dtype": _TURBOQUANT_NORM,
        },
    ),
    # per-key bits by a causal relevance gate (quant.RelevanceGated); bits: the low tier's
    "relevance_gated": CodecRule(
        bits=(1, 2, 3),
        calibrated=True,
        sides=("key",),
        trainable=False,  # its rotation is fixed: a gate, not a fit
        key_groups=True,
        options={  # no center / key_metric: those wrappers would hide the positions the gate is given
            "high_bits": Option((2, 3, 4, 5, 6, 7, 8), default=4),
            "share": Option((0.125, 0.25, 0.5), default=0.25),
            "trim": Option((0.0, 0.1, 0.2, 0.3), default=0.0),
            "half_life": Option(positive_int=True, nullable=True, default=None),
            "gate": Option(("relevance", "random"), default="relevance"),
            "norm_dtype": _TURBOQUANT_NORM,
        },
    ),
    "kivi": CodecRule(
        bits=(2, 4),
        rotations=("identity",),
        key_groups=True,  # keys quantized per channel over `group` tokens
        options={**_CENTER, "group": Option(positive_int=True, default=32)},
    ),
}


def codec_rule(name: str) -> CodecRule:
    if name not in CODECS:
        raise RuleError(f"codec={name!r} is not a codec; choose from {sorted(CODECS)}")
    return CODECS[name]


def check_bits(codec: str, bits, key: str = "bits", dim: int | None = None) -> int | float:
    """The bit width as int (integer widths) or float; refused unless the codec honours it exactly."""
    rule = codec_rule(codec)
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise RuleError(f"{key}={bits!r} must be a number; codec={codec} takes {rule.allowed_bits()}")
    if rule.budget:
        budget = None if dim is None else bits * dim
        if not 0 < bits <= MAX_BITS or (budget is not None and abs(budget - round(budget)) > 1e-9):
            raise RuleError(f"{key}={bits} is not allowed for codec={codec}: choose {rule.allowed_bits()}")
        return int(bits) if float(bits).is_integer() else float(bits)
    if float(bits).is_integer():
        bits = int(bits)
        if (rule.bits and bits not in rule.bits) or (not rule.bits and not rule.min_bits <= bits <= MAX_BITS):
            raise RuleError(
                f"{key}={bits} is not allowed for codec={codec}: choose from {rule.allowed_bits()}"
            )
        return bits
    if not rule.fractional or not rule.min_bits < bits < MAX_BITS:
        raise RuleError(f"{key}={bits} is not allowed for codec={codec}: choose from {rule.allowed_bits()}")
    if dim is not None:
        outliers = (bits - math.floor(bits)) * dim
        if abs(outliers - 8 * round(outliers / 8)) > 1e-9:
            raise RuleError(
                f"{key}={bits} at head_dim {dim} would need {outliers:g} outlier channels; fractional bits "
                f"take whole groups of 8 channels, so the fraction must be a multiple of {8 / dim:g}"
            )
    return float(bits)


def splits_outliers(codec: str, bits) -> bool:
    """Whether this width is honoured by the fractional outlier-channel split (quant.MixedPrecision)."""
    return codec_rule(codec).fractional and not float(bits).is_integer()


def stage1_bits(codec: str, bits: int) -> int:
    """Bits of the MSE stage a rotation sees: b for MSE, b − 1 for Prod (its QJL sketch takes one)."""
    return bits - codec_rule(codec).stage1_offset


def check_codec_rotation(codec: str, rotation: str) -> None:
    allowed = codec_rule(codec).rotations
    if allowed is not None and rotation not in allowed:
        raise RuleError(f"rotation={rotation} does not apply to codec={codec}: choose from {list(allowed)}")


def check_codec_dim(codec: str, options: dict, dim: int, side: str = "value") -> None:
    """Group sizes along the vector must divide head_dim (KIVI's group runs along tokens for keys, so it is
    checked for values, which group channels)."""
    for name in ("block", "group"):
        size = options.get(name)
        if name == "group" and side == "key" and codec_rule(codec).key_groups:
            continue
        if size is not None and dim % size:
            raise RuleError(f"codec.{name}={size} must divide head_dim {dim} for codec={codec}")


def codec_options(codec: str, given: dict) -> dict:
    return _check_options("codec", given, codec_rule(codec).options)
