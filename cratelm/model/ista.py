"""ISTA: CRATE's sparsification step, in place of the MLP.

Legend: N tokens (B*T flattened), d width, m = overcomplete * d dictionary atoms.

Complete dictionary (crate-gpt, the authors' ``ista``; W is d x d and ``F.linear(z, W) = z W^T``)::

    x_next = ReLU(z + eta * (z W - z W^T W) - eta * lambda)
           = ReLU(z + eta * (z - z W^T) W - eta * lambda)      two matmuls, not three

There is NO residual connection around this step: its output is the next layer's input.

Overcomplete dictionary (crate-lm, crate-alpha; W is m x d), ``steps`` ISTA iterations
from c0 = 0 on the code c (N, m), reusing a = z W^T::

    c1      = ReLU(eta * a - eta * lambda)
    c_{k+1} = ReLU(c_k + eta * (z - c_k W) W^T - eta * lambda)
    crate-lm:    out = c W                 (decoded with the same dictionary, no residual)
    crate-alpha: out = x' + c D^T          (a separate decoder D, d x m, and a residual)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cratelm.config import ModelConfig
from cratelm.kernels.ista import ista_complete, ista_overcomplete


def clamp_units(code: torch.Tensor, clamp: dict[int, float]) -> torch.Tensor:
    """A copy of ``code`` (..., m) with the units ``clamp`` maps set to their values (unit editing)."""
    units = torch.tensor(list(clamp), device=code.device)
    code = code.clone()
    code[..., units] = torch.tensor(list(clamp.values()), dtype=code.dtype, device=code.device)
    return code


class ISTA(nn.Module):
    """Sparse coding step against a learned dictionary (see the module docstring)."""

    clamp: dict[int, float] | None = None
    """Code units held at fixed values (``cratelm generate --clamp``); None, the default, costs nothing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.arch, self.eta, self.lmbda = cfg.arch, cfg.eta, cfg.lmbda
        self.steps, self.impl = cfg.ista_steps, cfg.ista_impl
        self.complete = cfg.arch == "crate-gpt"   # one step on a d x d dictionary, no decoding
        m = cfg.overcomplete * d
        self.weight = nn.Parameter(torch.empty(m, d))  # the dictionary, stored as the authors do
        # crate-alpha decodes with a separate matrix (and keeps the residual stream)
        self.decoder = nn.Linear(m, d, bias=False) if cfg.arch == "crate-alpha" else None
        self.drop = nn.Dropout(cfg.dropout)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # the authors keep PyTorch's default for a raw Parameter: kaiming_uniform_(a=0), U(+-sqrt(6/d))
        bound = math.sqrt(6.0 / self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound, generator=generator)

    def code(self, z: torch.Tensor) -> torch.Tensor:
        """The sparse code: the block output itself for crate-gpt, c (B, T, m) otherwise."""
        if self.complete:
            return ista_complete(z, self.weight, self.eta, self.lmbda, impl=self.impl)
        return ista_overcomplete(z, self.weight, self.eta, self.lmbda, steps=self.steps, impl=self.impl)

    def decode(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Back to the residual stream; ``x`` is the block's MSSA output x'."""
        if self.complete:
            return self.drop(c)
        if self.decoder is None:                 # crate-lm: the same dictionary, no residual
            return self.drop(c @ self.weight)
        return x + self.drop(self.decoder(c))    # crate-alpha

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c = self.code(z)
        if self.clamp:
            c = clamp_units(c, self.clamp)
        return self.decode(c, x)
