"""The validation set: ``train.eval_windows`` windows, whatever the batch split.

The set is the first ``eval_windows`` windows of the validation shard's seeded stream (the
sampler's order, epoch 0; at most every window once), cut into one contiguous share per
data-parallel rank and run in micro-batches of at most ``micro_batch`` windows (every rank
runs as many forward passes as the largest share needs: ZeRO-3 gathers collectively). The loss
of each micro-batch is weighted by its window count (float64 sums), so ``val/loss`` is the
mean over the same windows (each of ``context`` tokens) for every micro-batch x gradient
accumulation x data-parallel split of the same global batch; only fp32 rounding inside a
forward differs between splits.

The pipeline engine evaluates equal micro-batches only (``eval_batch``), so there the
number of windows must be a multiple of micro_batch x data-parallel size (checked before
any process group).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cratelm.config import ConfigError


def check(eval_windows: int, micro_batch: int, dp_size: int, pipeline: bool) -> None:
    if pipeline and eval_windows % (micro_batch * dp_size):
        raise ConfigError(f"train.eval_windows={eval_windows} must be a multiple of micro_batch x data-parallel size "
                          f"= {micro_batch} x {dp_size} with train.pipeline_stages > 1 (DeepSpeed's pipeline "
                          "evaluates equal micro-batches only)")


def share(windows, n: int, seed: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """Window indices of this data-parallel rank's share of the validation set."""
    from cratelm.data import BatchSampler

    n = min(n, len(windows))
    order = BatchSampler(windows, 1, 1, 0, 1, seed=seed).global_indices(0, n)
    return np.array_split(order, dp_size)[dp_rank]


def micro_batches(windows, indices: np.ndarray, micro_batch: int):
    """(x, y) tensors of ``indices``, ``micro_batch`` windows at a time (the pipeline's eval)."""
    for i in range(0, len(indices), micro_batch):
        x, y = windows.get_batch(indices[i: i + micro_batch])
        yield torch.from_numpy(x), torch.from_numpy(y)


def forward_calls(n: int, micro_batch: int, dp_size: int) -> int:
    """Forward passes every rank makes (the same on all: ZeRO-3 gathers parameters collectively)."""
    return -(-(-(-n // dp_size)) // micro_batch)


@torch.no_grad()
def loss_sum(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], windows, indices: np.ndarray,
             micro_batch: int, calls: int, device: torch.device | str = "cpu") -> float:
    """Sum over ``indices`` of each window's mean token loss (``forward`` returns a micro-batch's
    mean), in ``calls`` forward passes; passes beyond this rank's share run on window 0 and
    count nothing."""
    total = 0.0
    for c in range(calls):
        part = indices[c * micro_batch: (c + 1) * micro_batch]
        x, y = windows.get_batch(part if len(part) else np.zeros(1, np.int64))
        loss = forward(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        total += float(loss.double()) * len(part)
    return total
