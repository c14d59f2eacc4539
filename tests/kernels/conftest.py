"""Kernel tests: Triton runs on CPU tensors through its numpy interpreter when there is no GPU
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). fp32 and fp16 are
right under the interpreter, bf16 is not: bf16 checks are ``@pytest.mark.cuda``.
"""

import pytest
import torch


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the GPU when there is one, else the interpreter on CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
