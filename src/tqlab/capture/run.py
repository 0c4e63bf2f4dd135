"""Run a capture: text → token windows per split → model forward with the recorder → shards → manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..dtypes import DTYPES
from .hooks import AttentionRecorder
from .models import load_model, model_identity
from .store import (
    FORMAT_VERSION,
    CaptureError,
    CaptureStore,
    capture_dir,
    environment_facts,
    fingerprint,
    identity,
    manifest_sha256,
    shard_metadata,
    verified_sha256,
    write_json,
    write_shard,
)
from .text import (
    SPLITS,
    hash_tokens,
    leading_bos,
    split_documents,
    text_file_documents,
    text_file_identity,
    token_windows,
    wiki_documents,
    wikitext2_splits,
)

log = logging.getLogger(__name__)
TEXT_SOURCES = ("wiki", "wikitext2", "text_file")


def capture_spec(
    model: dict, data: dict, layers=None, store_dtype: str = "float16", shard_size: int = 4
) -> dict:
    """The configuration that identifies a capture (its fingerprint names the folder). The model and a text
    file are named by content (see model_identity, text_file_identity), so a capture means what it says
    whatever changes at their paths; `inputs` (not part of the identity) says where they are on this machine."""
    if data["source"] not in TEXT_SOURCES:
        raise ValueError(f"data.source={data['source']!r} cannot be captured; choose from {TEXT_SOURCES}")
    if store_dtype not in DTYPES:
        raise ValueError(f"capture.store_dtype={store_dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"capture.shard_size={shard_size!r} must be a positive integer")
    if layers is not None and len(layers) == 0:
        raise ValueError("store.layers=[] captures nothing: give null (every layer) or the layers to capture")
    # WikiText-2's splits are one long document each, so their windows are consecutive and the cap does not
    # apply (None, so that the setting cannot split one capture into several folders).
    per_document = None if data["source"] == "wikitext2" else data.get("windows_per_document", 1)
    if per_document is not None and (type(per_document) is not int or per_document < 1):
        raise ValueError(f"data.windows_per_document={per_document!r} must be a positive integer")
    text_file = data["path"] if data["source"] == "text_file" else None  # other sources read no file
    keys = ("source", "seq_len", "sequences", "split_fractions", "seed")
    return {
        "format_version": FORMAT_VERSION,
        "model": {
            **model_identity(model["name_or_path"]),
            **{k: model[k] for k in ("dtype", "weight_load")},
        },
        "data": {
            **{k: data.get(k) for k in keys},
            "text_file": None if text_file is None else text_file_identity(text_file),
            "windows_per_document": per_document,
        },
        "layers": None if layers is None else sorted(int(i) for i in layers),
        "store_dtype": store_dtype,
        "shard_size": shard_size,
        "inputs": {"model": model["name_or_path"], "text_file": text_file},
    }


def split_texts(spec: dict) -> dict[str, list]:
    """The capture's documents per split (train / validation / test), as the spec defines them."""
    data = spec["data"]
    if data["source"] == "wikitext2":
        return wikitext2_splits()
    if data["source"] == "wiki":
        docs = wiki_documents()
    else:
        docs = text_file_documents(spec["inputs"]["text_file"], data["text_file"]["sha256"])
    return split_documents(docs, tuple(data["split_fractions"]), data["seed"])


def run_capture(spec: dict, root: str | Path, device: str = "cpu", progress: bool = True) -> Path:
    """Create, resume, repair or reuse the capture for `spec` under `root`; returns its folder. A finished
    capture is reused only when it verifies in full; otherwise every shard is checked against its sha256
    sidecar, exactly the ones that fail are rebuilt, and the manifest is written anew."""
    out = capture_dir(root, spec)
    spec_file, manifest_file = out / "spec.json", out / "manifest.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) != identity(spec):
        raise CaptureError(
            f"{out} holds a capture of another configuration ({spec_file} differs); refusing to mix"
        )
    if manifest_file.is_file():
        try:
            CaptureStore(out)
        except CaptureError as err:
            log.warning("%s; rebuilding what fails verification", err)
            manifest_file.unlink()  # a manifest exists only while every shard it lists is verified
        else:
            log.info("capture %s is complete and verified: reusing it", out)
            return out

    loaded = load_model(
        name_or_path=spec["inputs"]["model"],
        dtype=spec["model"]["dtype"],
        weight_load=spec["model"]["weight_load"],
        device=device,
    )
    changed = {k: (v, loaded.facts.get(k)) for k, v in spec["model"].items() if loaded.facts.get(k) != v}
    if changed:
        raise CaptureError(
            f"model {spec['inputs']['model']!r} changed after the capture was configured: "
            + ", ".join(f"{k} was {a}, is {b} now" for k, (a, b) in changed.items())
            + "; run capture.py again"
        )
    n_layers = loaded.facts["architecture"]["num_layers"]
    if spec["layers"] is not None and not all(0 <= i < n_layers for i in spec["layers"]):
        raise CaptureError(
            f"store.layers={spec['layers']}: {spec['inputs']['model']} has layers 0..{n_layers - 1}"
        )
    write_json(spec_file, identity(spec))
    data = spec["data"]
    docs = split_texts(spec)
    dtype = DTYPES[spec["store_dtype"]]
    fp = fingerprint(spec)
    splits, layer_facts = {}, {}
    sources = {
        s: token_windows(
            loaded.tokenizer, docs[s], data["seq_len"], data["sequences"][s], data["windows_per_document"]
        )
        for s in SPLITS
    }
    for split in SPLITS:  # before any forward: a short split must not cost a partial capture
        _check_enough(data, split, len(docs[split]), len(sources[split]))
    windows = {s: [w.ids for w in sources[s]] for s in SPLITS}
    total = sum(-(-len(w) // spec["shard_size"]) for w in windows.values())
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="capture", unit="shard", disable=not progress)
    for split in SPLITS:
        shards = []
        for i in range(0, len(windows[split]), spec["shard_size"]):
            batch = windows[split][i : i + spec["shard_size"]]
            path = out / split / f"shard_{i // spec['shard_size']:05d}.safetensors"
            metadata = shard_metadata(fp, split, i)
            digest = verified_sha256(path, metadata)
            if digest is None:  # missing, interrupted before its sidecar, corrupted or foreign
                tensors, facts = _forward(loaded.model, batch, spec["layers"], dtype, device)
                bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
                if bad:  # overflowed activations (e.g. fp16 weights) would poison every later mean
                    raise CaptureError(
                        f"{path}: {', '.join(bad[:4])} contain NaN or Inf (split {split}, sequences {i}.."
                        f"{i + len(batch) - 1}); capture in model.dtype=float32 or store.dtype=float32"
                    )
                layer_facts.update(facts)
                digest = write_shard(path, tensors, metadata)
            shards.append(
                {"file": path.name, "sequences": len(batch), "bytes": path.stat().st_size, "sha256": digest}
            )
            bar.set_postfix(split=split)
            bar.update()
        splits[split] = {
            "documents": [d.title for d in docs[split]],
            "token_sha256": hash_tokens(windows[split]),
            "shards": shards,
            # sequence i of the split is windows[i]: lets reports aggregate per document
            "windows": [
                {"document": w.document, "title": w.title, "window": w.window} for w in sources[split]
            ],
        }
    bar.close()
    if not layer_facts:  # every shard existed: an interrupted run is being finished without new forwards
        _, layer_facts = _forward(loaded.model, windows["test"][:1], spec["layers"], dtype, device)
    recorded = sorted(int(k) for k in layer_facts)
    arch = loaded.facts["architecture"]
    candidates = spec["layers"] if spec["layers"] is not None else range(arch["num_layers"])
    groups = arch["num_heads"] // arch["num_kv_heads"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "spec": identity(spec),
        "model": loaded.facts,
        "device": device,
        "layers": {
            "captured": recorded,
            "without_kv_cache": [i for i in candidates if str(i) not in layer_facts],
            "facts": layer_facts,
        },
        "kv_head_of_query_head": [h // groups for h in range(arch["num_heads"])],
        "positions": "0..seq_len-1 in every window (no padding, causal mask)",
        "starts_with_bos": leading_bos(loaded.tokenizer) is not None,
        "splits": splits,
        **environment_facts(),
    }
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    write_json(manifest_file, manifest)
    CaptureStore(out, verify=False)
    log.info("capture written to %s", out)
    return out


def _check_enough(data: dict, split: str, n_docs: int, available: int) -> None:
    """Refuse a split whose documents cannot give the windows asked for, naming what to change."""
    wanted, per_document = data["sequences"][split], data["windows_per_document"]
    if available >= wanted:
        return
    fix = f"shorten data.seq_len or lower data.sequences.{split} to at most {available}"
    if per_document is not None:
        fix = f"raise data.windows_per_document (windows of one document are correlated), {fix}"
    raise CaptureError(
        f"data.sequences.{split}={wanted}, but the {n_docs} documents of split {split!r} give only "
        f"{available} windows of data.seq_len={data['seq_len']} tokens"
        + ("" if per_document is None else f" with data.windows_per_document={per_document}")
        + f" (a document shorter than a window gives none): {fix}"
    )


@torch.no_grad()
def _forward(model, batch: list[list[int]], layers, dtype, device) -> tuple[dict, dict]:
    ids = torch.tensor(batch, device=device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    with AttentionRecorder(model, layers=layers, dtype=dtype) as rec:
        model(input_ids=ids, position_ids=positions, use_cache=False)
    tensors = {"input_ids": ids.cpu(), "positions": positions.cpu().contiguous()}
    facts = {}
    layer_types = getattr(model.config, "layer_types", None)
    for idx, r in rec.layers.items():
        tensors[f"layer{idx}.q"], tensors[f"layer{idx}.k"], tensors[f"layer{idx}.v"] = (
            t.cpu() for t in (r.query, r.key, r.value)
        )
        facts[str(idx)] = {
            "scaling": r.scaling,
            "sliding_window": r.sliding_window,
            "layer_type": layer_types[idx] if layer_types else "full_attention",
        }
    return tensors, facts
