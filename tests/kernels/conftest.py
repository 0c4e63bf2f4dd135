import os

import torch

# Without a GPU the kernels run in Triton's interpreter, which is chosen when the kernels are defined:
# the variable must be set before tqlab.kernels (and so triton.jit) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
