"""Kernel tests: Triton runs on CPU tensors through its numpy interpreter when there is no GPU
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). fp32 and fp16 are
right under the interpreter, bf16 is not: bf16 checks are ``@pytest.mark.cuda``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the GPU when there is one, else the interpreter on CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def compile_for_hopper():
    """Run a script that compiles Triton kernels for sm_90 ahead of time (no GPU needed) in a
    fresh interpreter without TRITON_INTERPRET; it must print "compiled"."""
    def run(script: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
        res = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
    return run
