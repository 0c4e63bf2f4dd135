"""The tqlab cache: what is built or converted once per machine (offline models' safetensors, the compiled CPU
encode), under $TQLAB_CACHE, default ~/.cache/tqlab."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TQLAB_CACHE", Path.home() / ".cache" / "tqlab"))
