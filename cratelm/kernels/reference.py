"""Explicit masked-softmax attention: the ground truth every other backend is tested against."""

from __future__ import annotations

import math

import torch


def attention_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(p), masked above the diagonal when causal) v; all (B, H, T, p)."""
    T, S = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if causal:
        # query i sits at absolute position S - T + i (a cached prefix may precede it)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        att = att.masked_fill(~mask, float("-inf"))
    # softmax in at least fp32 (bf16/fp16 inputs), fp64 stays fp64
    probs = torch.softmax(att, dim=-1, dtype=torch.promote_types(att.dtype, torch.float32)).to(q.dtype)
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return probs @ v


def attention(w: torch.Tensor, causal: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    """MSSA's tied attention: w is query, key and value."""
    return attention_qkv(w, w, w, causal=causal, dropout_p=dropout_p)
