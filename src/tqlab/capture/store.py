"""A capture on disk: safetensors shards plus a JSON manifest, content-addressed, resumable, verified.

Layout of `<root>/<model>-<fingerprint>/`:
    spec.json                              the capture's configuration (written first); its fingerprint names
                                           the folder, and it names the model and text by content, never by path
    <split>/shard_<i>.safetensors          per shard of sequences: input_ids, positions [S, T] and, for every
                                           captured layer L, layer<L>.q [S, H, T, D], .k / .v [S, KVH, T, D]
    <split>/shard_<i>.safetensors.sha256   the shard's sha256 (`sha256sum -c` format), written right after it
    manifest.json                          written last: model and architecture facts, layers, splits,
                                           each sequence's document, shard sha256s, token hashes, package
                                           versions, git commit, time, and a sha256 of all that

Every file is written to a temporary name and renamed, and a shard counts only while its sidecar confirms its
bytes, so an interrupted or damaged capture is finished by re-running it: exactly the shards that fail are
rebuilt. Identical configurations give byte-identical shards. A different configuration has a different
fingerprint and so a different folder: captures never overwrite each other. Opening a store checks the
manifest against its own sha256, spec.json and the folder's name, and the shards' tensor shapes against the
manifest's facts (and, by default, every shard's sha256).
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

# 3: model and text named by content (no paths), windows start with BOS where the tokenizer starts texts with
# it, one canonical metadata entry per shard, sha256 sidecars, manifest_sha256
FORMAT_VERSION = 3
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
REBUILD = (
    "re-run capture.py with the same configuration: it re-verifies every shard, rebuilds exactly the ones "
    "that fail and rewrites manifest.json"
)


class CaptureError(RuntimeError):
    pass


def identity(spec: dict) -> dict:
    """What names a capture: the spec without `inputs` (where this machine finds the model and the text)."""
    return json.loads(json.dumps({k: v for k, v in spec.items() if k != "inputs"}, default=str))


def fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(identity(spec), sort_keys=True).encode()).hexdigest()


def folder_name(spec: dict) -> str:
    return f"{str(spec['model']['name']).strip('/').replace('/', '--')}-{fingerprint(spec)[:12]}"


def capture_dir(root: str | Path, spec: dict) -> Path:
    return Path(root) / folder_name(spec)


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without this field: protects the facts that no shard shape can
    confirm (the softmax scale, the sliding window)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:  # a full disk or Ctrl-C: no temp file left behind
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sidecar(shard: Path) -> Path:
    return shard.with_name(shard.name + ".sha256")


def shard_metadata(fp: str, split: str, first_sequence: int) -> dict[str, str]:
    # One entry of canonical JSON: safetensors writes several entries in a per-process order, and identical
    # captures must give identical bytes.
    info = {"fingerprint": fp, "split": split, "first_sequence": first_sequence}
    return {"tqlab": json.dumps(info, sort_keys=True)}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write the shard, then its sha256 sidecar; returns the sha256. A crash between the two leaves a shard
    that cannot be verified, which the next run rebuilds."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_bytes(sidecar(path), f"{digest}  {path.name}\n".encode())
    return digest


def verified_sha256(shard: Path, metadata: dict[str, str]) -> str | None:
    """The shard's sha256 when its sidecar confirms its bytes and its metadata says it is the shard of this
    capture at this place (not one copied in from elsewhere); None otherwise."""
    if not (shard.is_file() and sidecar(shard).is_file()):
        return None
    digest = sha256_file(shard)
    try:
        if sidecar(shard).read_text().split()[:1] != [digest]:
            return None
    except (UnicodeDecodeError, OSError):  # a damaged sidecar: the shard is rebuilt
        return None
    try:
        return digest if _header(shard).get("__metadata__") == metadata else None
    except (ValueError, AttributeError):
        return None


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


def _header(file: Path) -> dict:
    """A safetensors file's JSON header: tensor names, dtypes and shapes, and its metadata."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(min(n, file.stat().st_size - 8)))


class CaptureStore:
    """Read side of a capture: checked on open, tensors read lazily (only the slices asked for)."""

    def __init__(self, path: str | Path, verify: bool = True):
        """`verify=False` skips only the shards' sha256s; the manifest's integrity, its agreement with spec.json
        and the folder's name, and every shard's size and tensor shapes are always checked."""
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
            raise CaptureError(f"{manifest} is corrupt ({err}): {REBUILD}") from err
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CaptureError(
                f"{manifest} has format {self.manifest.get('format_version')}, expected {FORMAT_VERSION}: "
                "run capture.py again (a capture of this format goes to a new folder)"
            )
        if self.manifest.get("manifest_sha256") != manifest_sha256(self.manifest):
            raise CaptureError(
                f"{manifest} was changed after the capture wrote it (its content does not match its "
                f"manifest_sha256), so none of its facts can be trusted: {REBUILD}"
            )
        self._check_configuration(manifest)
        for split, info in self.manifest["splits"].items():
            first = 0
            for shard in info["shards"]:
                self._verify(split, shard, first, verify)
                first += shard["sequences"]

    def _check_configuration(self, manifest: Path) -> None:
        spec_file = self.path / "spec.json"
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CaptureError(
                f"{spec_file} is missing or unreadable ({err}): remove it if present, then {REBUILD}"
            ) from err
        if folder_name(spec) != self.path.name:
            raise CaptureError(
                f"{self.path} does not hold the configuration its name says: its {spec_file.name} has "
                f"fingerprint {fingerprint(spec)[:12]}, whose folder is named {folder_name(spec)} (the folder "
                f"was renamed or spec.json edited): rename it back, or delete it and run capture.py again"
            )
        if spec != self.manifest["spec"] or fingerprint(spec) != self.manifest["fingerprint"]:
            raise CaptureError(
                f"{manifest} disagrees with {spec_file} (spec or fingerprint edited): {REBUILD}"
            )

    def _expected_header(self, split: str, shard: dict, first: int) -> dict:
        """What the manifest says the shard holds: tensor (dtype, shape)s and the shard's metadata."""
        arch, spec = self.architecture, self.manifest["spec"]
        s, t, d = shard["sequences"], spec["data"]["seq_len"], arch["head_dim"]
        dtype = _SAFETENSORS_DTYPES[spec["store_dtype"]]
        want = {"input_ids": ("I64", [s, t]), "positions": ("I64", [s, t])}
        for layer in self.layers:
            want[f"layer{layer}.q"] = (dtype, [s, arch["num_heads"], t, d])
            want[f"layer{layer}.k"] = want[f"layer{layer}.v"] = (dtype, [s, arch["num_kv_heads"], t, d])
        want["__metadata__"] = shard_metadata(self.manifest["fingerprint"], split, first)
        return want

    def _verify(self, split: str, shard: dict, first: int, full: bool) -> None:
        file = self.path / split / shard["file"]
        refuse_pickle(file)
        if not file.is_file():
            raise CaptureError(f"{file} is missing: {REBUILD}")
        size = file.stat().st_size
        if size != shard["bytes"]:
            raise CaptureError(
                f"{file} has {size} bytes, the manifest says {shard['bytes']} (truncated?): {REBUILD}"
            )
        try:
            header = _header(file)
            got = {k: v if k == "__metadata__" else (v["dtype"], v["shape"]) for k, v in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CaptureError(f"{file} has an unreadable header ({err}; corrupted): {REBUILD}") from err
        want = self._expected_header(split, shard, first)
        for name in sorted(want.keys() | got.keys()):
            if got.get(name) != want.get(name):
                raise CaptureError(
                    f"{file} disagrees with {self.path / 'manifest.json'}: {name} is {got.get(name)}, the "
                    "manifest's facts (num_heads, num_kv_heads, head_dim, data.seq_len, captured layers, "
                    f"store_dtype, fingerprint) make it {want.get(name)}: {REBUILD}"
                )
        if full and sha256_file(file) != shard["sha256"]:
            raise CaptureError(f"{file} does not match its sha256 in the manifest (corrupted): {REBUILD}")

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
        if sequence < 0:
            raise IndexError(f"sequence {sequence} is out of range: sequences count from 0")
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
        kv_heads = self.architecture["num_kv_heads"]
        if kv_head is not None and not 0 <= kv_head < kv_heads:
            raise IndexError(f"kv_head {kv_head} is out of range: this capture has {kv_heads} KV heads")
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
            raise CaptureError(f"{file} could not be read ({err}): {REBUILD}") from err
        return {"q": q.float(), "k": k.float(), "v": v.float(), "positions": positions}
