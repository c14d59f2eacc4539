"""Small helpers with no cratelm dependencies: file hashes and device timing."""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings are real."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, trials: int = 8) -> float:
    """The best rate (TFLOP/s) of an n x n x n matmul over ``trials``: the MFU denominator,
    measured on this device in this run (the best trial: other processes only slow it down)."""
    import torch

    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best
