"""A compressed KV cache inside `model.generate`: TurboQuantCache, the attention that reads its codes, and
the one verb that applies a spec to a model (`compress_kv`)."""

from .cache import PROTOCOLS, TurboQuantCache, TurboQuantLayer, compress_kv

__all__ = ["PROTOCOLS", "TurboQuantCache", "TurboQuantLayer", "compress_kv"]
