"""What `tqlab.cache` needs of transformers, checked when the package is imported, before any of its modules
touch transformers' cache API."""

import transformers
from packaging.version import Version

MIN_TRANSFORMERS = "5.24"  # as pyproject.toml: models' `cache=` argument, per-layer cache kwargs


def require_transformers(version: str) -> None:
    """An older transformers (a GPU image's own, ahead of the one installed) breaks the cache deep inside a
    forward call; name the version and where it was imported from instead."""
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"tqlab.cache needs transformers>={MIN_TRANSFORMERS}; this Python imports {version} from "
            f"{transformers.__file__}"
        )


require_transformers(transformers.__version__)
