"""Incremental decoding for ``CrateLM.generate``: the per-layer token cache and sampling."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V) -> (B, 1); temperature 0 picks the argmax."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class TokenCache:
    """Preallocated per-layer cache for incremental decoding.

    CRATE stores ONE tensor per layer (u, used as key and value); GPT-2 stores two (k, v).
    ``extend`` writes the new tokens at the current position and returns views over
    everything cached so far; ``advance`` moves the position after all layers ran.
    """

    def __init__(self, n_layer: int, n_tensors: int, batch: int, n_head: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (n_tensors, batch, n_head, max_len, head_dim)
        self.buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len, self.pos = max_len, 0

    def extend(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = new[0].shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; cannot add {T} at position {self.pos}")
        buf = self.buffers[layer]
        for i, t in enumerate(new):
            buf[i, :, :, self.pos:self.pos + T] = t
        return tuple(buf[i, :, :, :self.pos + T] for i in range(len(new)))

    def advance(self, n: int) -> None:
        self.pos += n

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)
