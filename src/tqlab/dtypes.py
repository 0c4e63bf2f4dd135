"""Float dtypes by the names configs use (model weights, stored captures, stored norms)."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
