"""The store's promises: resume, no-op re-runs, no clobbering, refusal of corrupt and pickle files."""

import json
import shutil

import pytest

from tqlab.capture import run as capture_run
from tqlab.capture.run import capture_spec, run_capture
from tqlab.capture.store import CaptureError, CaptureStore, capture_dir


def test_interrupted_capture_resumes_without_redoing_finished_shards(
    tmp_path, monkeypatch, smollm2, small_spec_parts
):
    MODEL, DATA = small_spec_parts
    monkeypatch.setattr(capture_run, "load_model", lambda **_: smollm2)
    spec = capture_spec(MODEL, DATA, layers=[0, 29], shard_size=1)
    real_forward, calls = capture_run._forward, []

    def dies_on_third_shard(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_forward(*args)

    monkeypatch.setattr(capture_run, "_forward", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run_capture(spec, tmp_path, progress=False)
    out = capture_dir(tmp_path, spec)
    first = out / "train" / "shard_00000.safetensors"
    stamp = first.stat().st_mtime_ns
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob(".*"))  # no half-written temporary file survives as a shard

    monkeypatch.setattr(capture_run, "_forward", real_forward)
    assert run_capture(spec, tmp_path, progress=False) == out
    assert first.stat().st_mtime_ns == stamp
    store = CaptureStore(out)
    assert store.layers == [0, 29] and store.num_sequences("test") == 2

    monkeypatch.setattr(
        capture_run, "load_model", lambda **_: pytest.fail("a finished capture must not reload")
    )
    assert run_capture(spec, tmp_path, progress=False) == out


def test_different_configurations_never_share_a_folder(tmp_path, small_spec_parts):
    MODEL, DATA = small_spec_parts
    a = capture_spec(MODEL, DATA)
    b = capture_spec(MODEL, {**DATA, "seq_len": 128})
    assert capture_dir(tmp_path, a) != capture_dir(tmp_path, b)
    out = capture_dir(tmp_path, a)
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps(b))  # a foreign capture where ours would go
    with pytest.raises(CaptureError, match="another configuration"):
        run_capture(a, tmp_path, progress=False)


@pytest.fixture
def copy_of(small_capture, tmp_path):
    return shutil.copytree(small_capture, tmp_path / small_capture.name)  # a capture's name is its identity


def test_truncated_shard_is_named_with_the_fix(copy_of):
    shard = copy_of / "test" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CaptureError, match=r"shard_00001.safetensors has 1000 bytes.*re-run capture.py"):
        CaptureStore(copy_of)


def test_corrupted_shard_fails_its_checksum(copy_of):
    shard = copy_of / "train" / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CaptureError, match="shard_00000.safetensors does not match its sha256"):
        CaptureStore(copy_of)


def test_corrupt_manifest_and_unfinished_capture_are_refused(copy_of):
    (copy_of / "manifest.json").write_text("{not json")
    with pytest.raises(CaptureError, match="manifest.json is corrupt"):
        CaptureStore(copy_of)
    (copy_of / "manifest.json").unlink()
    with pytest.raises(CaptureError, match="not a finished capture"):
        CaptureStore(copy_of)


def test_pickle_files_are_never_loaded(tmp_path):
    import pickle

    bad = tmp_path / "capture.pt"
    bad.write_bytes(pickle.dumps({"k": [1, 2, 3]}))
    with pytest.raises(CaptureError, match="never unpickles"):
        CaptureStore(bad)


def test_a_users_text_file_is_split_by_document_and_captured(
    tmp_path, monkeypatch, smollm2, small_spec_parts
):
    model, data = small_spec_parts
    monkeypatch.setattr(capture_run, "load_model", lambda **_: smollm2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(
            f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 40 for i in range(10)
        )
    )
    data = {**data, "source": "text_file", "path": str(corpus), "windows_per_document": 2}
    spec = capture_spec(model, data, layers=[3], shard_size=2)
    store = CaptureStore(run_capture(spec, tmp_path / "captures", progress=False))
    splits = store.manifest["splits"]
    assert [len(splits[s]["documents"]) for s in ("train", "validation", "test")] == [7, 2, 1]
    # the test split's one document gives both its windows, consecutive from its start
    assert [(w["document"], w["window"]) for w in splits["test"]["windows"]] == [(0, 0), (0, 1)]
    assert store.layers == [3] and store.load("test", 3, 0)["k"].shape == (3, 64, 64)


def test_wikitext2_uses_the_datasets_splits(monkeypatch):
    import sys
    import types

    from tqlab.capture.text import wikitext2_splits

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: {
        s: {"text": [f"{s} line one\n", f"{s} line two\n"]} for s in ("train", "validation", "test")
    }
    monkeypatch.setitem(sys.modules, "datasets", fake)
    splits = wikitext2_splits()
    assert splits["test"][0].text == "test line one\ntest line two\n"
    assert set(splits) == {"train", "validation", "test"}


def test_layers_beyond_the_model_are_refused(tmp_path, monkeypatch, smollm2, small_spec_parts):
    model, data = small_spec_parts
    monkeypatch.setattr(capture_run, "load_model", lambda **_: smollm2)
    with pytest.raises(CaptureError, match=r"has layers 0\.\.29"):
        run_capture(capture_spec(model, data, layers=[3, 30]), tmp_path, progress=False)


def test_a_text_file_edited_after_the_capture_was_named_is_refused(
    tmp_path, monkeypatch, smollm2, small_spec_parts
):
    model, data = small_spec_parts
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Document one. " * 200 + "\n\nDocument two. " * 200)
    spec = capture_spec(model, {**data, "source": "text_file", "path": str(corpus)}, layers=[3])

    def load_model_while_the_file_is_edited(**_):
        corpus.write_text("edited")
        return smollm2

    monkeypatch.setattr(capture_run, "load_model", load_model_while_the_file_is_edited)
    with pytest.raises(ValueError, match="changed while the capture started"):
        run_capture(spec, tmp_path / "captures", progress=False)


def test_out_of_range_sequences_and_kv_heads_are_refused(small_capture):
    store = CaptureStore(small_capture)
    kv_heads = store.architecture["num_kv_heads"]
    for sequence, kv_head in [(-1, 0), (0, -1), (0, kv_heads)]:
        with pytest.raises(IndexError, match="out of range"):
            store.load("test", store.layers[0], sequence, kv_head)


def test_an_empty_layer_list_is_refused(small_spec_parts):
    model, data = small_spec_parts
    with pytest.raises(ValueError, match=r"store.layers=\[\] captures nothing"):
        capture_spec(model, data, layers=[])


def test_a_damaged_sidecar_means_rebuild_and_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import os

    import torch

    from tqlab.capture.store import atomic_write_bytes, sidecar, verified_sha256, write_shard

    shard, metadata = tmp_path / "shard_00000.safetensors", {"tqlab": "{}"}
    assert verified_sha256(shard, metadata) is None  # nothing written yet
    write_shard(shard, {"x": torch.zeros(3)}, metadata)
    assert verified_sha256(shard, metadata) is not None
    sidecar(shard).write_bytes(b"\xff\x00garbage")
    assert verified_sha256(shard, metadata) is None

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard.name, sidecar(shard).name]
