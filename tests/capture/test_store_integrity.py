"""A store never gives wrong numbers: edited manifests, specs and folder names are refused; re-running the
capture repairs exactly the shards that fail; identical captures are identical bytes."""

import json
import shutil
import subprocess
import sys

import pytest

from tqlab.capture import run as capture_run
from tqlab.capture.run import run_capture
from tqlab.capture.store import CaptureError, CaptureStore, capture_dir


@pytest.fixture
def copy_of(small_capture, tmp_path):
    return shutil.copytree(small_capture, tmp_path / small_capture.name)


def edit_manifest(folder, change, rehash):
    """Apply `change` to the manifest; with rehash, also refresh its manifest_sha256 (a careful forger, or a
    writer that got a fact wrong)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if rehash:
        from tqlab.capture.store import manifest_sha256

        manifest["manifest_sha256"] = manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))


def arch(key, value):
    return lambda m: m["model"]["architecture"].__setitem__(key, value)


@pytest.mark.parametrize(
    "change,rehash,message",
    [
        (arch("num_kv_heads", 1), False, r"manifest.json was changed after the capture wrote it"),
        (arch("num_kv_heads", 1), True, r"test/shard_00000.safetensors disagrees with .*: layer0.k is"),
        (arch("num_heads", 3), True, r"shard_00000.safetensors disagrees with .*: layer0.q is"),
        (arch("head_dim", 32), True, r"shard_00000.safetensors disagrees with .*: layer0.k is"),
        (lambda m: m["layers"]["captured"].remove(29), True, r"disagrees with .*: layer29.k is"),
        (lambda m: m["layers"]["facts"]["0"].update(scaling=1.0), False, r"was changed after the capture"),
        (lambda m: m["spec"]["data"].update(seq_len=32), True, r"manifest.json disagrees with .*spec.json"),
        (lambda m: m.update(fingerprint="0" * 64), True, r"manifest.json disagrees with .*spec.json"),
    ],
    ids=["kv_heads", "kv_heads-rehashed", "heads", "head_dim", "layers", "scaling", "spec", "fingerprint"],
)
def test_edited_manifest_facts_are_refused_naming_the_file(copy_of, change, rehash, message):
    edit_manifest(copy_of, change, rehash)
    with pytest.raises(CaptureError, match=message):
        CaptureStore(copy_of, verify=False)  # shapes and the manifest's integrity are checked even so


def test_a_capture_folder_must_hold_the_configuration_its_name_says(copy_of, small_spec):
    spec = json.loads((copy_of / "spec.json").read_text())
    (copy_of / "spec.json").write_text(json.dumps({**spec, "shard_size": 2}))
    with pytest.raises(CaptureError, match=r"does not hold the configuration its name says.*rename it back"):
        CaptureStore(copy_of)
    (copy_of / "spec.json").write_text(json.dumps(spec))
    # renamed to the folder of another configuration
    other = capture_dir(copy_of.parent, {**small_spec, "shard_size": 2})
    with pytest.raises(CaptureError, match=rf"whose folder is named {copy_of.name}"):
        CaptureStore(copy_of.rename(other))


@pytest.fixture
def tiny_capture(tmp_path, tiny_model, corpus, tiny_spec):
    """(spec, folder) of a finished capture of a tiny local model: shards train 0, 1, validation 0, test 0."""
    spec = tiny_spec(tiny_model(), corpus)
    return spec, run_capture(spec, tmp_path / "captures", progress=False)


def record_forwards(monkeypatch):
    real, calls = capture_run._forward, []

    def counted(model, batch, *args):
        calls.append(batch)
        return real(model, batch, *args)

    monkeypatch.setattr(capture_run, "_forward", counted)
    return calls


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rerunning_the_capture_rebuilds_exactly_the_shard_that_fails(tiny_capture, monkeypatch):
    spec, out = tiny_capture
    bad = out / "train" / "shard_00001.safetensors"
    original = bad.read_bytes()
    flip_a_byte(bad)
    with pytest.raises(CaptureError, match="re-run capture.py with the same configuration"):
        CaptureStore(out)
    stamps = {f: f.stat().st_mtime_ns for f in out.rglob("*.safetensors") if f != bad}
    calls = record_forwards(monkeypatch)
    assert run_capture(spec, out.parent, progress=False) == out
    assert len(calls) == 1  # that shard's sequence only
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    assert bad.read_bytes() == original
    CaptureStore(out)


def test_without_a_manifest_only_shards_that_verify_are_kept(tiny_capture, monkeypatch):
    spec, out = tiny_capture
    corrupted, unverifiable = (
        out / "train" / "shard_00000.safetensors",
        out / "test" / "shard_00000.safetensors",
    )
    originals = {f: f.read_bytes() for f in (corrupted, unverifiable)}
    (out / "manifest.json").unlink()
    flip_a_byte(corrupted)
    unverifiable.with_name(unverifiable.name + ".sha256").unlink(missing_ok=True)
    calls = record_forwards(monkeypatch)
    run_capture(spec, out.parent, progress=False)
    assert len(calls) == 2
    assert {f: f.read_bytes() for f in originals} == originals
    CaptureStore(out)


def test_an_edited_manifest_is_rewritten_by_rerunning_the_capture(tiny_capture, monkeypatch):
    spec, out = tiny_capture
    edit_manifest(out, lambda m: m["layers"]["facts"]["0"].update(scaling=1.0), rehash=False)
    foreign = out / "train" / "shard_00001.safetensors"  # another place's shard, with its own sidecar
    for suffix in ("", ".sha256"):
        shutil.copy(out / "train" / f"shard_00000.safetensors{suffix}", f"{foreign}{suffix}")
    calls = record_forwards(monkeypatch)
    run_capture(spec, out.parent, progress=False)
    assert len(calls) == 1  # the foreign shard; every other shard verified and was kept
    assert CaptureStore(out).layer_facts(0)["scaling"] == 0.25


CAPTURE_ONCE = """
import json, sys
from tqlab.capture.run import run_capture
print(run_capture(json.loads(sys.argv[1]), sys.argv[2], progress=False))
"""


def test_identical_captures_in_two_processes_are_identical_bytes(tmp_path, tiny_model, corpus, tiny_spec):
    spec = tiny_spec(tiny_model(), corpus)
    folders, runs = [], {}
    for root in ("a", "b"):  # at once: each process is mostly its imports
        command = [sys.executable, "-c", CAPTURE_ONCE, json.dumps(spec), str(tmp_path / root)]
        runs[root] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for root, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        folders.append(tmp_path / root / stdout.strip().splitlines()[-1].rsplit("/", 1)[-1])
    files = sorted(f.relative_to(folders[0]) for f in folders[0].rglob("*") if f.is_file())
    assert len([f for f in files if f.suffix == ".safetensors"]) == 4
    for rel in files:
        if rel.name != "manifest.json":  # it records the time
            assert (folders[0] / rel).read_bytes() == (folders[1] / rel).read_bytes(), rel


def test_non_finite_activations_are_refused_at_capture_naming_the_shard(
    tmp_path, tiny_model, corpus, tiny_spec
):
    from safetensors.torch import load_file, save_file

    folder = tiny_model()
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("inf")  # layer 1's values overflow
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    spec = tiny_spec(folder, corpus)
    with pytest.raises(
        CaptureError, match=r"shard_00000.safetensors: layer1\.v contain NaN or Inf \(split train"
    ):
        run_capture(spec, tmp_path / "captures", progress=False)
