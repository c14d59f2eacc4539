"""The learning-rate schedule: linear warm-up, then cosine decay to a floor.

The LR of an optimizer step is a pure function of the step index, so a resumed run needs
no scheduler state: the trainer writes ``lr_at(step)`` into the optimizer's parameter
groups before every step (``set_lr``). Step ``s`` is the 0-based index of the update::

    s <  W:          lr * (s + 1) / W                       (W = warmup_steps)
    W <= s < D:      min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (D - W))) / 2
    s >= D:          min_lr                                 (D = decay_steps or max_steps)
"""

from __future__ import annotations

import math

from cratelm.config import OptimConfig


def decay_steps(optim: OptimConfig, max_steps: int) -> int:
    """D: the step at which the cosine reaches min_lr."""
    return optim.decay_steps if optim.decay_steps is not None else max_steps


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    warm, end = optim.warmup_steps, decay_steps(optim, max_steps)
    if step < warm:
        return optim.lr * (step + 1) / warm
    if step >= end:
        return optim.min_lr
    progress = (step - warm) / max(1, end - warm)
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group (all groups share one schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
