"""Evaluation of compressed KV caches: attention quality on captured blocks (module) and codec set-up (codecs)."""
