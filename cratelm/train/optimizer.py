"""The optimizer: AdamW with two parameter groups (weight decay on 2-D tensors only), built by
cratelm and handed to DeepSpeed as a client optimizer: ``torch.optim.AdamW(fused=True)``
on CUDA, ``torch.optim.AdamW`` on CPU (DeepSpeed's ``"torch_adam": true``; no compiled
ops), DeepSpeed's ``DeepSpeedCPUAdam`` when ZeRO offloads optimizer state from a GPU.

The optimizer can skip a step (``skip_next``), which is how ``train.nan_policy=skip`` drops
an update after a non-finite loss on any rank. The learning rate is written into its
groups by the trainer before every step (cratelm.train.schedule).
"""

from __future__ import annotations

from typing import Any

import torch

from cratelm.config import JobConfig
from cratelm.dist import all_reduce


def param_groups(named_parameters, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on every 2-D tensor (matrices, embeddings), none on LayerNorm
    weights and biases. A tied tensor is listed once."""
    decay, no_decay, seen = [], [], set()
    for _, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _skippable(base: type) -> type:
    class Skippable(base):  # type: ignore[misc, valid-type]
        """``base`` whose step() does nothing when ``skip_next`` is set, or (``check_grads``)
        when any gradient of any rank is non-finite (one all-reduce per call)."""

        def __init__(self, *args, check_grads: bool = False, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.skip_next = False
            self.check_grads = check_grads
            self.skipped = False          # set when a step was dropped; the trainer resets it

        def _nonfinite_anywhere(self) -> bool:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            dev = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            flag = torch.zeros(1, device=dev)
            for gr in grads:
                flag += (~torch.isfinite(gr)).any().float()
            all_reduce(flag, op="max")
            return bool(flag.item() > 0)

        @torch.no_grad()
        def step(self, closure=None, **kwargs):
            if self.skip_next or (self.check_grads and self._nonfinite_anywhere()):
                self.skipped = True
                return None
            return super().step(closure, **kwargs)

    Skippable.__name__ = Skippable.__qualname__ = f"Skippable{base.__name__}"
    return Skippable


def make_optimizer(groups: list[dict], cfg: JobConfig, dev_type: str, check_grads: bool = False):
    """AdamW over ``groups``: fused on CUDA, torch's on CPU, DeepSpeedCPUAdam for ZeRO-Offload on GPU."""
    o = cfg.optim
    kwargs: dict[str, Any] = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    if cfg.train.offload_optimizer and dev_type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return _skippable(DeepSpeedCPUAdam)(groups, adamw_mode=True, check_grads=check_grads, **kwargs)
    if dev_type == "cuda" and not cfg.train.offload_optimizer:
        kwargs["fused"] = True
    return _skippable(torch.optim.AdamW)(groups, check_grads=check_grads, **kwargs)
