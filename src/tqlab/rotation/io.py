"""Rotation artefacts: trained parameters as safetensors, with the facts needed to rebuild them as metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from . import Rotation, make_rotation

ORTHOGONALITY_TOLERANCE = 1e-4  # fp32 rotations rebuilt from their parameters: ~1e-6 at d = 256


def save_rotations(path: str | Path, rotations: dict[str, Rotation], facts: dict) -> None:
    """Write every rotation's parameters and buffers as `<unit>.<name>` tensors, atomically.

    facts must hold what `make_rotation` needs (name, dim and options such as view); it is stored as JSON
    metadata alongside anything else worth keeping (config, bits, codec, layer list)."""
    from safetensors.torch import save

    tensors = {
        f"{unit}.{k}": v.detach().cpu().contiguous()
        for unit, r in rotations.items()
        for k, v in r.state_dict().items()
    }
    data = save(tensors, metadata={"tqlab": json.dumps({**facts, "units": sorted(rotations)}, default=str)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def load_rotations(path: str | Path) -> tuple[dict[str, Rotation], dict]:
    """Rebuild the rotations saved by `save_rotations`; returns (rotations by unit, facts)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"refusing {path}: rotations are loaded only from .safetensors files (never pickles)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            facts = json.loads(f.metadata()["tqlab"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable tqlab rotation file ({err}); re-run train.py to recreate it"
        ) from err
    missing = [k for k in ("units", "rotation", "dim") if k not in facts]
    if missing:
        raise ValueError(f"{path} lacks the facts {missing} that rebuild its rotations; re-run train.py")
    foreign = sorted({k.split(".")[0] for k in tensors} - set(facts["units"]))
    if foreign:
        raise ValueError(f"{path} holds tensors of units {foreign[:4]} that its facts do not list")
    rotations = {}
    for unit in facts["units"]:  # a per-layer selection records each unit's own options (e.g. its view)
        options = {**facts.get("rotation_options", {}), **facts.get("unit_options", {}).get(unit, {})}
        rot = make_rotation(facts["rotation"], facts["dim"], **options)
        prefix = f"{unit}."
        try:
            rot.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        except RuntimeError as err:
            raise ValueError(f"{path}: unit {unit}'s tensors do not rebuild its rotation ({err})") from err
        if not all(torch.isfinite(t).all() for t in rot.state_dict().values()):
            raise ValueError(f"{path}: unit {unit} holds NaN or Inf; re-run train.py")
        if any(True for _ in rot.buffers()):  # learned parameters alone (exp of skew generators) are
            m = rot.matrix().double()  # orthogonal by construction; stored matrices and signs need not be
            error = (m @ m.T - torch.eye(rot.dim, dtype=torch.float64)).abs().max().item()
            if not error <= ORTHOGONALITY_TOLERANCE:
                raise ValueError(
                    f"{path}: unit {unit} is not a rotation (|R Rᵀ − I| = {error:.3g}); re-run train.py"
                )
        rotations[unit] = rot
    return rotations, facts


def unit_name(layer: int, kv_head: int | None = None, target: str = "key") -> str:
    """Name of a fitted unit: one rotation per (target, layer) or per (target, layer, KV head)."""
    return f"{target}_layer{layer}" + ("" if kv_head is None else f"_head{kv_head}")


def rotation_for(rotations: dict[str, Rotation], layer: int, kv_head: int, target: str) -> Rotation | None:
    """The fitted rotation of (layer, head) — per-head if fitted so, else the layer's — or None."""
    return rotations.get(unit_name(layer, kv_head, target)) or rotations.get(unit_name(layer, None, target))
