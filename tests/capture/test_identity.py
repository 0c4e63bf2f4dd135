"""A capture is named by what its model and text are, not by where they are: a local folder changed in place
is another capture, and no folder name, spec or manifest holds an absolute path."""

import json

import pytest

from tqlab.capture.run import run_capture
from tqlab.capture.store import CaptureError, CaptureStore


def set_config(model_dir, **changes):
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_local_model_and_text_are_named_by_content_not_by_path(tmp_path, tiny_model, corpus, tiny_spec):
    model = tiny_model("tiny-lm")
    first = run_capture(tiny_spec(model, corpus), tmp_path / "captures", progress=False)
    assert first.name.startswith("tiny-lm-")
    for text in (first.name, (first / "spec.json").read_text(), (first / "manifest.json").read_text()):
        assert str(tmp_path) not in text
    assert CaptureStore(first).layer_facts(0)["scaling"] == 0.25

    set_config(model, attention_multiplier=0.5)  # the same path now holds another model
    second = run_capture(tiny_spec(model, corpus), tmp_path / "captures", progress=False)
    assert second != first and CaptureStore(second).layer_facts(0)["scaling"] == 0.5

    corpus.write_text(corpus.read_text().replace("fox", "cat"))  # and the same file another text
    assert run_capture(tiny_spec(model, corpus), tmp_path / "captures", progress=False) not in (first, second)


def test_a_model_changed_after_configuration_is_refused_naming_both(tmp_path, tiny_model, corpus, tiny_spec):
    model = tiny_model()
    spec = tiny_spec(model, corpus)
    set_config(model, attention_multiplier=0.5)
    with pytest.raises(
        CaptureError, match=r"changed after the capture was configured: files_sha256 was \w+, is \w+"
    ):
        run_capture(spec, tmp_path / "captures", progress=False)


def test_a_hub_model_is_named_by_its_config_and_the_snapshot_it_resolved_to(tmp_path, monkeypatch):
    import transformers.utils

    from tqlab.capture.models import model_identity

    def cached_file(repo, name):  # the hub cache's layout: models--org--name/snapshots/<commit>/<file>
        path = tmp_path / "models--org--m" / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"model_type": "llama"}')
        return str(path)

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    revision = "0123abcd"
    first = model_identity("org/m")
    revision = "4567ef01"  # new weights under the same config.json
    second = model_identity("org/m")
    assert first["config_sha256"] == second["config_sha256"]
    assert (first["revision"], second["revision"]) == ("0123abcd", "4567ef01")


def test_a_run_on_a_hub_model_is_named_by_the_snapshot_it_reads(tmp_path, monkeypatch):
    import transformers.utils
    from omegaconf import OmegaConf

    from tqlab.runs import input_identities

    def cached_file(repo, name):
        path = tmp_path / "models--org--m" / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        return str(path)

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    cfg = OmegaConf.create({"data": {"source": "wiki"}, "model": {"name_or_path": "org/m"}})
    revision = "0123abcd"
    first = input_identities(cfg)
    revision = "4567ef01"
    assert input_identities(cfg) != first  # new weights: a new run, not the old one's results
