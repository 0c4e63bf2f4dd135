"""A compressed KV cache inside `model.generate`: TurboQuantCache, the attention that reads its codes, the
one verb that applies a spec to a model (`compress_kv`), and decoding replayed from a CUDA graph
(`GraphDecoder`)."""

from . import requirements  # noqa: F401, I001  (first: the transformers version, before its cache API)
from ..kv.layout import CacheLayout
from ..registry import PROTOCOLS
from .cache import TurboQuantCache, TurboQuantLayer, compress_kv
from .graphs import GraphDecoder

__all__ = ["PROTOCOLS", "CacheLayout", "GraphDecoder", "TurboQuantCache", "TurboQuantLayer", "compress_kv"]
