"""Root conftest: runs before any test module imports the kernels.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors, so their parity tests run
in CI. ``TRITON_INTERPRET`` must be set before the kernels are defined, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
