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
from collections.abc import Callable
from typing import TYPE_CHECKING

from cratelm.kernels.registry import ATTENTION

if TYPE_CHECKING:
    import torch

BACKENDS = ATTENTION  # name -> module implementing it (cratelm.kernels.registry)


def outside_autocast(fn, *args):
    """Call a hand-written autograd Function ``fn(*args)`` so that it sees ONE dtype: under
    autocast the floating-point tensor arguments are cast to the autocast dtype and the
    call runs with autocast off (its saved tensors and its backward then agree)."""
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    dev = tensors[0].device.type if tensors else "cpu"
    if dev == "meta" or not torch.is_autocast_enabled(dev):
        return fn(*args)
    dtype = torch.get_autocast_dtype(dev)
    cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with torch.autocast(dev, enabled=False):
        return fn(*cast)


def get_backend(name: str) -> ModuleType:
    """Import and return the module of backend ``name``; a clear error otherwise."""
    if name not in ATTENTION:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION)}")
    try:
        return importlib.import_module(ATTENTION[name])
    except ImportError as e:
        raise RuntimeError(f"attention backend {name!r} is not available: {e}") from e


def resolve_attention(name: str, qkv: bool = False, dropout: bool = False) -> Callable:
    """The attention function of backend ``name``, checked once: ``attention(w, causal[, dropout_p])``
    or, with ``qkv``, ``attention_qkv(q, k, v, causal[, dropout_p])``. Modules resolve it at
    construction, so a forward pass makes no import or signature lookup (torch.compile
    traces it as one graph)."""
    try:
        mod = get_backend(name)
    except RuntimeError as e:   # not installed here: building the model works, calling it says why
        def unavailable(*args, error: str = str(e), **kwargs):
            raise RuntimeError(error)
        return unavailable
    fn_name = "attention_qkv" if qkv else "attention"
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise ValueError(f"attention backend {name!r} only supports tied q=k=v (CRATE); "
                         "use 'sdpa', 'flash' or 'reference' for gpt2")
    if dropout and "dropout_p" not in inspect.signature(fn).parameters:
        raise ValueError(f"attention backend {name!r} has no attention dropout")
    return fn


def attention(w: "torch.Tensor", backend: str = "sdpa", causal: bool = True,
              dropout_p: float = 0.0) -> "torch.Tensor":
    """Softmax attention with ``w`` (B, H, T, p) used as query, key and value; ``dropout_p``
    drops attention probabilities (training only; not supported by ``triton``)."""
    if w.dim() != 4:
        raise ValueError(f"attention expects w of shape (B, H, T, p), got {tuple(w.shape)}")
    fn = resolve_attention(backend, dropout=bool(dropout_p))
    return fn(w, causal=causal, dropout_p=dropout_p) if dropout_p else fn(w, causal=causal)


def attention_qkv(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor",
                  backend: str = "sdpa", causal: bool = True, dropout_p: float = 0.0) -> "torch.Tensor":
    """Ordinary attention with separate q, k, v (B, H, T, p), for the GPT-2 baseline."""
    fn = resolve_attention(backend, qkv=True, dropout=bool(dropout_p))
    return fn(q, k, v, causal=causal, dropout_p=dropout_p) if dropout_p else fn(q, k, v, causal=causal)
