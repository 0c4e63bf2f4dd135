"""Per-layer choice among fitted rotations (the triality views), made on the validation split only.

    choice = select_per_layer({"vector": a, "spinor_plus": b, ...}, source, calibration)
    merge_per_layer(choice, {"vector": a, ...}, out / "best.safetensors")   # eval.py rotations=<out>

Each candidate is a train run's rotation file of the same fit (codec, bits, sides, centring) that differs
only in its rotation options, e.g. the Spin(8) view. For every layer the candidate with the highest mean
attention-output cosine over that layer's validation blocks (keys coded by the candidate's codec, values
exact, the real queries, causal softmax, float64) is chosen; the merged file holds, per unit, the chosen
candidate's rotation and records its options per unit, so `load_rotations` rebuilds each in its own view.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..kv import KVQuantSpec
from ..kv.builder import CodecBank
from ..metrics.attention import causal_mask, output_cosine
from ..rotation.io import load_rotations, save_rotations

SPLIT = "validation"  # the only split a selection reads: train fits the candidates, test reports the choice


def _spec(path: Path, facts: dict) -> KVQuantSpec:
    sides = tuple(s for s, b in facts["bits"].items() if b is not None)
    if "key" not in sides:
        raise ValueError(f"{path} holds no key rotations; a selection scores candidates by their keys")
    return KVQuantSpec.create(
        facts["codec"],
        facts["bits"]["key"],
        compress=sides,
        codec_options={"center": (facts.get("center") or {}).get("key", False)},
        fitted=path,
    )


def validation_scores(path: str | Path, source, calibration) -> dict[int, float]:
    """Mean output cosine per layer over the validation split, keys coded with the file's rotations, each
    layer attended as the model does (its softmax scale and sliding window)."""
    from ..kv.spec import FittedRotations

    path = Path(path)
    facts = FittedRotations.read(path).facts
    capture = source.manifest["fingerprint"]
    if facts.get("capture") not in (None, capture):
        raise ValueError(
            f"{path} was fitted on capture {facts['capture'][:16]}; this source is capture {capture[:16]}"
        )
    layers = facts.get("layers") or source.layers
    missing = sorted(set(layers) - set(source.layers))
    if missing:
        raise ValueError(f"{path} was fitted on layers {missing} that this source does not hold")
    spec = _spec(path, facts)
    bank = CodecBank(spec, source.architecture["head_dim"], calibration)
    bank.check_units(layers, source.architecture["num_kv_heads"])
    scores = {}
    for layer in layers:
        layer_facts = source.layer_facts(layer)
        scale, window = layer_facts["scaling"], layer_facts.get("sliding_window") or 0
        values = []
        for head in range(source.architecture["num_kv_heads"]):
            codec = bank.get("key", layer, head, "cpu")
            for s in range(source.num_sequences(SPLIT)):
                block = source.load(SPLIT, layer, s, head)
                q, k, v = (block[x].double() for x in "qkv")
                k_hat = codec.dequantize(codec.quantize(block["k"])).double()
                mask = causal_mask(k.shape[0], k.shape[0], window=window)
                exact = torch.softmax((q @ k.T * scale).masked_fill(~mask, float("-inf")), -1) @ v
                approx = torch.softmax((q @ k_hat.T * scale).masked_fill(~mask, float("-inf")), -1) @ v
                values.append(output_cosine(exact, approx).mean().item())
        scores[layer] = sum(values) / len(values)
    return scores


def select_per_layer(candidates: dict[str, str | Path], source, calibration) -> tuple[dict[int, str], dict]:
    """{layer: candidate name} by validation output cosine, and every candidate's per-layer scores."""
    scores = {name: validation_scores(path, source, calibration) for name, path in candidates.items()}
    layers = next(iter(scores.values()))
    choice = {layer: max(scores, key=lambda name: scores[name][layer]) for layer in layers}
    return choice, scores


def merge_per_layer(
    choice: dict[int, str], candidates: dict[str, str | Path], out: str | Path, label: str = "per_layer"
) -> Path:
    """Write one rotation file whose units of layer L come from candidate choice[L]; `label` names the
    selection in place of the view (results and reports show it)."""
    loaded = {name: load_rotations(path) for name, path in candidates.items()}
    first_facts = next(iter(loaded.values()))[1]
    for name, (_, facts) in loaded.items():
        same = {k: facts.get(k) for k in ("codec", "bits", "center", "rotation", "dim", "units", "model")}
        if same != {k: first_facts.get(k) for k in same}:
            raise ValueError(f"candidate {name} is not the same fit as the others (codec, bits, units, ...)")
    rotations, unit_options = {}, {}
    for unit in first_facts["units"]:
        layer = int(unit.split("_layer")[1].split("_")[0])
        name = choice[layer]
        rotations[unit] = loaded[name][0][unit]
        unit_options[unit] = loaded[name][1].get("rotation_options", {})
    options = dict(first_facts.get("rotation_options", {}))
    if "view" in options:
        options["view"] = label
    facts = {
        **first_facts,
        "rotation_options": options,
        "unit_options": unit_options,
        "selection": {
            "split": SPLIT,
            "metric": "output_cosine",
            "per_layer": {str(k): v for k, v in choice.items()},
        },
    }
    facts.pop("units", None)
    out = Path(out)
    save_rotations(out, rotations, facts)
    return out
