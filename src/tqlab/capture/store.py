"""A capture on disk: safetensors shards plus a JSON manifest, content-addressed, resumable, verified.

Layout of `<root>/<model>-<fingerprint>/`:
    spec.json                              the capture's configuration (written first)
    <split>/shard_<i>.safetensors          per shard of sequences: input_ids, positions [S, T] and, for every
                                           captured layer L, layer<L>.q [S, H, T, D], .k / .v [S, KVH, T, D]
    manifest.json                          written last: model and architecture facts, layers, splits,
                                           each sequence's document, shard sha256s, token hashes, package
                                           versions, git commit, time

Every file is written to a temporary name and renamed, so a shard that exists is complete; an interrupted
capture resumes at the first missing shard, and a finished one is a no-op. A different configuration has
a different fingerprint and so a different folder: captures never overwrite each other.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from .models import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: windows drawn across documents, each sequence's document recorded
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}


class CaptureError(RuntimeError):
    pass


def fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def capture_dir(root: str | Path, spec: dict) -> Path:
    slug = str(spec["model"]["name_or_path"]).strip("/").replace("/", "--")
    return Path(root) / f"{slug}-{fingerprint(spec)[:12]}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def environment_facts() -> dict:
    versions = {}
    for pkg in ("tqlab", "torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "versions": versions,
        "git_commit": commit or None,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CaptureError(
            f"refusing {path}: tqlab never unpickles files; captures are folders of .safetensors shards "
            "with a manifest.json (run capture.py to make one)"
        )


class CaptureStore:
    """Read side of a capture: verified on open, tensors read lazily (only the slices asked for)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        refuse_pickle(self.path)
        manifest = self.path / "manifest.json"
        if not self.path.is_dir() or not manifest.is_file():
            raise CaptureError(
                f"{self.path} is not a finished capture (no manifest.json): run capture.py with the same "
                "configuration to create or resume it"
            )
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise CaptureError(
                f"{manifest} is corrupt ({err}); delete it and re-run capture.py to rebuild"
            ) from err
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CaptureError(
                f"{manifest} has format {self.manifest.get('format_version')}, expected {FORMAT_VERSION}"
            )
        for split, info in self.manifest["splits"].items():
            for shard in info["shards"]:
                self._verify(self.path / split / shard["file"], shard, verify)

    def _verify(self, file: Path, shard: dict, full: bool) -> None:
        fix = f"delete {file} and re-run capture.py with the same configuration (it resumes)"
        refuse_pickle(file)
        if not file.is_file():
            raise CaptureError(f"{file} is missing: {fix}")
        size = file.stat().st_size
        if size != shard["bytes"]:
            raise CaptureError(
                f"{file} has {size} bytes, the manifest says {shard['bytes']} (truncated?): {fix}"
            )
        if full and sha256_file(file) != shard["sha256"]:
            raise CaptureError(f"{file} does not match its sha256 in the manifest (corrupted): {fix}")

    # -- facts -------------------------------------------------------------------------------------
    @property
    def architecture(self) -> dict:
        return self.manifest["model"]["architecture"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]["captured"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def num_sequences(self, split: str) -> int:
        return sum(s["sequences"] for s in self.manifest["splits"][split]["shards"])

    def layer_facts(self, layer: int) -> dict:
        return self.manifest["layers"]["facts"][str(layer)]

    def document_of(self, split: str, sequence: int) -> str:
        """The title of the document that `sequence` of `split` was cut from (windows of one document are
        correlated: aggregate per document)."""
        self._shard_of(split, sequence)  # the same errors as load() for an unknown split or sequence
        return self.manifest["splits"][split]["windows"][sequence]["title"]

    # -- tensors -----------------------------------------------------------------------------------
    def _shard_of(self, split: str, sequence: int) -> tuple[Path, int]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} is not in this capture; it has {self.splits}")
        start = 0
        for shard in self.manifest["splits"][split]["shards"]:
            if sequence < start + shard["sequences"]:
                return self.path / split / shard["file"], sequence - start
            start += shard["sequences"]
        raise IndexError(f"sequence {sequence} is out of range: split {split!r} has {start} sequences")

    def load(
        self, split: str, layer: int, sequence: int, kv_head: int | None = None
    ) -> dict[str, torch.Tensor]:
        """q [G, T, D] (the query heads that read kv_head; all H heads if kv_head is None), k and v [T, D]
        (or [KVH, T, D]), positions [T]: float32 whatever the stored dtype."""
        from safetensors import safe_open

        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not captured; captured layers: {self.layers}")
        file, row = self._shard_of(split, sequence)
        groups = self.architecture["num_heads"] // self.architecture["num_kv_heads"]
        try:
            with safe_open(str(file), framework="pt") as f:
                if kv_head is None:
                    q = f.get_slice(f"layer{layer}.q")[row]
                    k, v = (f.get_slice(f"layer{layer}.{n}")[row] for n in "kv")
                else:
                    q = f.get_slice(f"layer{layer}.q")[row, kv_head * groups : (kv_head + 1) * groups]
                    k, v = (f.get_slice(f"layer{layer}.{n}")[row, kv_head] for n in "kv")
                positions = f.get_slice("positions")[row]
        except Exception as err:  # safetensors raises its own error types for bad headers and short files
            raise CaptureError(f"{file} could not be read ({err}); delete it and re-run capture.py") from err
        return {"q": q.float(), "k": k.float(), "v": v.float(), "positions": positions}
