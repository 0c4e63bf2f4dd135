"""The seam between configuration and codecs: a validated `KVQuantSpec` (torch-free) and the one builder
(`tqlab.kv.builder`, imports torch) that turns it into a codec per (side, layer, KV head).

from tqlab.kv import KVQuantSpec
spec = KVQuantSpec.create("turboquant_mse", bits=3, rotation="fast_hadamard", head_dim=64)
"""

from ..registry import RuleError
from .layout import CacheLayout
from .spec import CodecSpec, FittedRotations, KVQuantSpec, RotationSpec, SideSpec

__all__ = [
    "CacheLayout",
    "CodecSpec",
    "FittedRotations",
    "KVQuantSpec",
    "RotationSpec",
    "RuleError",
    "SideSpec",
]
