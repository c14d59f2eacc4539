"""The GPT-2 block, the baseline CRATE is compared against on the same data and hardware.

Legend: B batch, T tokens, d width, H heads, p = d / H.

    x = x + W_o attn(q, k, v of LN1(x))     separate q, k, v projections (with bias)
    x = x + W_2 GELU(W_1 LN2(x))            MLP of width mlp_ratio * d (GPT-2's tanh GELU)
    a final LayerNorm before the tied head
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cratelm.config import ModelConfig
from cratelm.kernels import resolve_attention
from cratelm.model.generate import TokenCache
from cratelm.model.ista import clamp_units


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim, self.backend = cfg.n_head, cfg.head_dim, cfg.attn_backend
        self.attend = resolve_attention(cfg.attn_backend, qkv=True, dropout=cfg.dropout > 0)   # once
        self.attend_cached = resolve_attention("reference" if cfg.attn_backend == "reference" else "sdpa", qkv=True)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.attn_dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: TokenCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)   # (B, H, T, p)
                   for t in self.qkv(x).split(d, dim=2))
        attend, dropout_p = self.attend, self.attn_dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.extend(layer, k, v)
            attend = self.attend_cached
        y = attend(q, k, v, causal=True, dropout_p=dropout_p) if dropout_p else attend(q, k, v, causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, d)))


class GPT2Block(nn.Module):
    """x + attn(LN1(x)), then + MLP(LN2(x))."""

    cache_tensors = 2  # k and v
    clamp: dict[int, float] | None = None
    """MLP neurons held at fixed values (they stand in for CRATE's code units when editing)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.mlp_proj = nn.Linear(cfg.mlp_ratio * d, d)
        self.mlp_drop = nn.Dropout(cfg.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        """Projections into the residual stream (initialised with std / sqrt(2L), as GPT-2)."""
        return [self.attn.proj, self.mlp_proj]

    def forward(self, x: torch.Tensor, cache: TokenCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp_drop(self.mlp_proj(self.neurons(self.ln2(x))))

    def neurons(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP's hidden units GELU(W_1 z) (B, T, mlp_ratio * d), clamped when editing."""
        h = F.gelu(self.fc(z), approximate="tanh")
        return clamp_units(h, self.clamp) if self.clamp else h

