import pytest

from tqlab.capture.models import load_model
from tqlab.capture.run import capture_spec, run_capture

MODEL = {"name_or_path": "smollm2-135m", "dtype": "float32", "weight_load": "none"}
DATA = {
    "source": "wiki",
    "path": None,
    "seq_len": 64,
    "sequences": {"train": 2, "validation": 1, "test": 2},
    "split_fractions": [0.7, 0.15, 0.15],
    "seed": 0,
}


@pytest.fixture
def small_spec_parts():
    """(model, data) sections of a small capture of the real default model."""
    return dict(MODEL), dict(DATA)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, converted once into the tqlab cache and shared by the session."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def small_capture(tmp_path_factory, smollm2):
    spec = capture_spec(MODEL, DATA, store_dtype="float32", shard_size=1)
    return run_capture(spec, tmp_path_factory.mktemp("captures"), progress=False)
