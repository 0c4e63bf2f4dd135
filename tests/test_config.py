"""Configs compose, and bad ones fail before any compute with the key and the allowed values."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tqlab.config import ConfigError, capture_section, data_section, model_section
from tqlab.tasks import capture, kv_source

CONF = str(Path(__file__).parents[1] / "conf")


def cfg(*overrides, name="capture"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("model", ["smollm2_135m", "qwen2_5_coder_1_5b"])
@pytest.mark.parametrize("data", ["wiki", "wikitext2", "synthetic"])
def test_every_shipped_model_and_data_option_validates(model, data):
    c = cfg(f"model={model}", f"data={data}")
    model_section(c), data_section(c), capture_section(c)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.source=foo"], r"data.source='foo' is not allowed; choose from \['wiki'"),
        (["model.dtype=int8"], "model.dtype='int8' is not allowed"),
        (["model.weight_load=4bit"], "needs model.device=cuda"),
        (["capture.store_dtype=float8"], "capture.store_dtype='float8'"),
        (["data.seq_len=1"], "data.seq_len=1 must be an integer >= 2"),
        (["data.sequences.test=0"], "data.sequences.test=0"),
        (["data.split_fractions=[0.5,0.5,0.5]"], "summing to 1"),
        (["model=hf"], "model.name_or_path is required"),
        (["data=text_file"], "data.path is required"),
    ],
)
def test_bad_configs_fail_before_any_compute(overrides, message):
    with pytest.raises(ConfigError, match=message):
        capture(cfg(*overrides))


def test_synthetic_source_needs_no_capture():
    c = cfg("data=synthetic")
    assert kv_source(c).architecture["num_kv_heads"] == 2
    with pytest.raises(ConfigError, match="needs no capture"):
        capture(c)
