"""Attention backends behind one switch.

Notation: B batch, H heads, T tokens, p head width. CRATE's MSSA uses ONE tensor
``w`` (B, H, T, p) as query, key and value; GPT-2 uses separate q, k, v.

Every backend module is imported lazily (flash-attn and triton are optional) and exposes
``attention(w, causal=True)`` for the tied case. Backends that also serve GPT-2 expose
``attention_qkv(q, k, v, causal=True)``. The softmax scale is always 1/sqrt(p).
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> module implementing it. `reference` is the ground truth the tests compare to.
BACKENDS: dict[str, str] = {
    "reference": "cratelm.kernels.reference",
    "sdpa": "cratelm.kernels.sdpa",
    "flash": "cratelm.kernels.flash",
    "triton": "cratelm.kernels.triton_mssa",
}


def outside_autocast(fn, *args):
    """Call a hand-written autograd Function ``fn(*args)`` so that it sees ONE dtype: under
    autocast the floating-point tensor arguments are cast to the autocast dtype and the
    call runs with autocast off (its saved tensors and its backward then agree)."""
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    dev = tensors[0].device.type if tensors else "cpu"
    if not torch.is_autocast_enabled(dev):
        return fn(*args)
    dtype = torch.get_autocast_dtype(dev)
    cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with torch.autocast(dev, enabled=False):
        return fn(*cast)


def get_backend(name: str) -> ModuleType:
    """Import and return the module of backend ``name``; a clear error otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise RuntimeError(f"attention backend {name!r} is not available: {e}") from e


def attention(w: "torch.Tensor", backend: str = "sdpa", causal: bool = True,
              dropout_p: float = 0.0) -> "torch.Tensor":
    """Softmax attention with ``w`` (B, H, T, p) used as query, key and value; ``dropout_p``
    drops attention probabilities (training only; not supported by ``triton``)."""
    if w.dim() != 4:
        raise ValueError(f"attention expects w of shape (B, H, T, p), got {tuple(w.shape)}")
    mod = get_backend(backend)
    if dropout_p:
        if "dropout_p" not in inspect.signature(mod.attention).parameters:
            raise ValueError(f"attention backend {backend!r} has no attention dropout (dropout_p={dropout_p})")
        return mod.attention(w, causal=causal, dropout_p=dropout_p)
    return mod.attention(w, causal=causal)


def attention_qkv(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor",
                  backend: str = "sdpa", causal: bool = True, dropout_p: float = 0.0) -> "torch.Tensor":
    """Ordinary attention with separate q, k, v (B, H, T, p), for the GPT-2 baseline."""
    mod = get_backend(backend)
    if not hasattr(mod, "attention_qkv"):
        raise ValueError(f"attention backend {backend!r} only supports tied q=k=v (CRATE); "
                         "use 'sdpa', 'flash' or 'reference' for gpt2")
    if dropout_p:
        return mod.attention_qkv(q, k, v, causal=causal, dropout_p=dropout_p)
    return mod.attention_qkv(q, k, v, causal=causal)
