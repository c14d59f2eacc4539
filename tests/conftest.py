import os

import pytest
import torch

# Triton kernels run on CPU tensors through its numpy interpreter; the variable must be set
# before triton is first imported (fp32/fp16 are right there, bf16 is not: bf16 -> cuda tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
