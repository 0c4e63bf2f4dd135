"""A compressed KV cache inside `model.generate`: TurboQuantCache, the attention that reads its codes, and
the one verb that applies a spec to a model (`compress_kv`)."""

from ..kv.layout import CacheLayout
from ..registry import PROTOCOLS
from .cache import TurboQuantCache, TurboQuantLayer, compress_kv

__all__ = ["PROTOCOLS", "CacheLayout", "TurboQuantCache", "TurboQuantLayer", "compress_kv"]
