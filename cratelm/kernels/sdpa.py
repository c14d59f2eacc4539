"""torch's fused scaled-dot-product attention (flash / memory-efficient / math kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  dropout_p: float = 0.0) -> torch.Tensor:
    if causal and q.shape[-2] != k.shape[-2]:
        # a block of new queries after a cached prefix: is_causal would align the mask top-left
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)


def attention(w: torch.Tensor, causal: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    # q = k = v: the fused kernels read the same tensor three times
    return attention_qkv(w, w, w, causal=causal, dropout_p=dropout_p)
