"""LM head + cross-entropy.

``plain`` materialises the (N, V) logits; other implementations (added by the kernels
work) must give the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_IMPLS = ("plain",)


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 impl: str = "plain", ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight^T`` against ``targets``.

    hidden (..., d), weight (V, d), targets (...) int64; targets equal to ``ignore_index``
    are not scored.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown loss implementation {impl!r}; choose one of {LOSS_IMPLS}")
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)
