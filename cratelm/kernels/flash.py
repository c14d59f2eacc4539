"""flash-attn's ``flash_attn_func`` (CUDA, fp16/bf16 only)."""

from __future__ import annotations

import torch

try:
    from flash_attn import flash_attn_func
except ImportError as e:  # the registry turns this into "backend 'flash' is not available"
    raise ImportError("the flash-attn package is not installed (pip install flash-attn; CUDA only)") from e


def attention_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  dropout_p: float = 0.0) -> torch.Tensor:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"the 'flash' backend needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}; "
                           "use 'sdpa' on CPU or in fp32")
    # flash-attn wants (B, T, H, p); a cached prefix aligns the causal mask bottom-right, as we want
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                          dropout_p=dropout_p)
    return out.transpose(1, 2)


def attention(w: torch.Tensor, causal: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    return attention_qkv(w, w, w, causal=causal, dropout_p=dropout_p)
