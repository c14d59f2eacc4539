"""MSSA: multi-head subspace self-attention, CRATE's compression step.

Legend: B batch, T tokens, d width, K heads (= subspaces), p = d / K head width.

One projection U (d x d, no bias) gives each token's coordinates in the K subspaces,
and those coordinates are the query, the key AND the value (the authors' ``c_attn``)::

    u   = z U^T                                    (B, T, d) -> (B, K, T, p)
    y_k = softmax(u_k u_k^T / sqrt(p), causal) u_k  one head per subspace
    out = concat_k(y_k) W_o^T + b_o                (the authors' ``c_proj``)

so ``x + MSSA(LN(x))`` is a gradient step that compresses the tokens against the subspaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from cratelm.config import ModelConfig
from cratelm.kernels import resolve_attention

if TYPE_CHECKING:
    from cratelm.model.generate import TokenCache


class MSSA(nn.Module):
    """u = z U^T; y_k = softmax(u_k u_k^T / sqrt(p)) u_k; out = concat(y) W_o^T + b_o."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.backend = cfg.attn_backend
        self.attend = resolve_attention(cfg.attn_backend, dropout=cfg.dropout > 0)   # once, not per call
        self.attend_cached = resolve_attention("reference" if cfg.attn_backend == "reference" else "sdpa", qkv=True)
        self.U = nn.Linear(d, d, bias=False)      # ONE projection: query = key = value
        self.proj = nn.Linear(d, d, bias=True)    # W_o, b_o
        self.attn_dropout = cfg.dropout                # on the attention probabilities
        self.resid_drop = nn.Dropout(cfg.dropout)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """The tokens' subspace coordinates, (B, T, d) -> (B, K, T, p)."""
        B, T, _ = z.shape
        return self.U(z).view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, z: torch.Tensor, cache: TokenCache | None = None, layer: int = 0) -> torch.Tensor:
        w = self.project(z)                                    # (B, K, T, p)
        if cache is None:
            dropout_p = self.attn_dropout if self.training else 0.0
            y = self.attend(w, causal=True, dropout_p=dropout_p) if dropout_p else self.attend(w, causal=True)
        else:
            # generation: ONE cached tensor per layer serves as both keys and values
            (w_all,) = cache.extend(layer, w)
            y = self.attend_cached(w, w_all, w_all, causal=True)
        B, K, T, p = y.shape
        y = y.transpose(1, 2).reshape(B, T, K * p)             # concat heads
        return self.resid_drop(self.proj(y))
