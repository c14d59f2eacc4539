"""Streaming white-box statistics of a model on a token sample, in bounded memory.

Legend: B windows per batch, T tokens per window, K heads (subspaces), p head width,
m code units per layer (d for crate-gpt, overcomplete * d for crate-lm / crate-alpha, the
mlp_ratio * d GELU neurons for gpt2, which stand in for code units).

The sample is the first N tokens of a token stream, cut into windows of T tokens that the
model reads from their start. Per layer it keeps, whatever N is:

- per unit: how many tokens it fires on (activation > 0), and its top-k activations with
  the stream position of the firing token (k x m numbers);
- per head: the sum of its coding rate R^c over windows (cratelm.model.diagnostics) and the
  top pairs of tokens attending to each other, ranked by their attention weight over the
  uniform weight, w_ij * (i + 1) (a token attending to itself is left out: with q = k
  every CRATE token is most similar to itself);
- the coding rate of the MSSA input and output (their difference is the compression).

All state lives in fixed-size numpy arrays; a batch's tensors are dropped after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cratelm.model.crate import CrateLM
from cratelm.model.diagnostics import coding_rate, crate_layers


@dataclass
class LayerStats:
    """One layer's running statistics (see the module docstring)."""

    units: int
    heads: int
    k: int
    pairs: int
    fires: np.ndarray = field(init=False)
    top_val: np.ndarray = field(init=False)     # (m, k), descending
    top_pos: np.ndarray = field(init=False)     # (m, k) stream positions, -1 = empty
    head_rate: np.ndarray = field(init=False)   # (K,) sum over windows of R^c of head k
    pair_val: np.ndarray = field(init=False)    # (K, pairs) w_ij * (i + 1), descending
    pair_pos: np.ndarray = field(init=False)    # (K, pairs, 2) stream positions (query, key)
    pair_w: np.ndarray = field(init=False)      # (K, pairs) attention weight w_ij
    rate_in: float = 0.0                        # sums over windows
    rate_out: float = 0.0

    def __post_init__(self) -> None:
        self.fires = np.zeros(self.units, np.int64)
        self.top_val = np.full((self.units, self.k), -np.inf, np.float32)
        self.top_pos = np.full((self.units, self.k), -1, np.int64)
        self.head_rate = np.zeros(self.heads, np.float64)
        self.pair_val = np.full((self.heads, self.pairs), -np.inf, np.float32)
        self.pair_pos = np.full((self.heads, self.pairs, 2), -1, np.int64)
        self.pair_w = np.zeros((self.heads, self.pairs), np.float32)


@dataclass
class SampleStats:
    """What `collect` returns: per-layer statistics over ``tokens`` tokens in ``windows`` windows."""

    layers: list[LayerStats]
    tokens: int
    windows: int
    window: int


def _merge(val: np.ndarray, pos: np.ndarray, new_val: np.ndarray, new_pos: np.ndarray,
           extra: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Keep, row by row, the largest ``val.shape[1]`` of (val | new_val), in place; ties keep the
    earlier stream position (the old entries come first)."""
    allv = np.concatenate([val, new_val], axis=1)
    order = np.argsort(-allv, axis=1, kind="stable")[:, : val.shape[1]]
    val[:] = np.take_along_axis(allv, order, 1)
    allp = np.concatenate([pos, new_pos], axis=1)
    idx = order if allp.ndim == 2 else order[..., None]
    pos[:] = np.take_along_axis(allp, idx, 1)
    if extra is not None:
        old, new = extra
        old[:] = np.take_along_axis(np.concatenate([old, new], axis=1), order, 1)


def layer_walk(model: CrateLM, idx: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor]]:
    """Per layer: (head coordinates of the attention input (B, K, T, p), of its output, the
    code units (B, T, m), queries and keys (B, K, T, p)). CRATE: u = LN1(x) U^T is query, key
    and value; gpt2: the value projection gives the subspace coordinates, the MLP's GELU
    units the code."""
    if model.cfg.arch != "gpt2":
        for u_in, u_out, code in crate_layers(model, idx):
            yield u_in, u_out, code, u_in, u_in
        return
    x = model.embed(idx)
    for block in model.blocks.values():
        B, T, d = x.shape
        H, p = block.attn.n_head, block.attn.head_dim

        def heads(t: torch.Tensor) -> list[torch.Tensor]:
            return [s.view(B, T, H, p).transpose(1, 2) for s in block.attn.qkv(t).split(d, dim=2)]

        q, k, v_in = heads(block.ln1(x))
        x = x + block.attn(block.ln1(x))
        v_out = heads(block.ln1(x))[2]
        h = block.neurons(block.ln2(x))
        yield v_in, v_out, h, q, k
        x = x + block.mlp_drop(block.mlp_proj(h))


def windows(n_tokens: int, window: int, batch: int) -> Iterator[tuple[int, int, int]]:
    """(first window start, number of windows, window length) per batch: full windows of
    ``window`` tokens from 0, then the shorter remainder (if >= 2 tokens) on its own."""
    full = n_tokens // window
    for b in range(0, full, batch):
        yield b * window, min(batch, full - b), window
    rest = n_tokens - full * window
    if rest >= 2:
        yield full * window, 1, rest


@torch.no_grad()
def collect(model: CrateLM, tokens: np.ndarray, n_tokens: int, window: int | None = None, batch: int = 4,
            k: int = 10, pairs: int = 10, device: str | torch.device = "cpu", progress: bool = False) -> SampleStats:
    """Stream the first ``n_tokens`` of ``tokens`` (an array or memory map) through ``model``."""
    from tqdm import tqdm

    cfg = model.cfg
    model.eval()
    T = min(window or cfg.context, cfg.context)
    N = min(int(n_tokens), len(tokens))
    if N < 2:
        raise ValueError(f"the sample needs at least 2 tokens; the data has {len(tokens)}, asked for {n_tokens}")
    from cratelm.workbench.edit import code_width

    layers = [LayerStats(code_width(model), cfg.n_head, k, pairs) for _ in range(cfg.n_layer)]
    n_windows = 0
    bar = tqdm(total=N, desc="inspect", unit="tok", disable=not progress, leave=False)
    for start, rows, length in windows(N, T, batch):
        chunk = np.asarray(tokens[start:start + rows * length], dtype=np.int64)
        idx = torch.from_numpy(chunk).view(rows, length).to(device)
        pos = np.arange(start, start + rows * length, dtype=np.int64).reshape(rows, length)
        for st, (u_in, u_out, code, q, kk) in zip(layers, layer_walk(model, idx)):
            _update(st, u_in, u_out, code, q, kk, pos)
        n_windows += rows
        bar.update(rows * length)
    bar.close()
    return SampleStats(layers, N, n_windows, T)


def _update(st: LayerStats, u_in: torch.Tensor, u_out: torch.Tensor, code: torch.Tensor, q: torch.Tensor,
            k: torch.Tensor, pos: np.ndarray) -> None:
    B, K, T, p = q.shape
    st.rate_in += float(coding_rate(u_in).sum())
    st.rate_out += float(coding_rate(u_out).sum())
    for h in range(K):
        st.head_rate[h] += float(coding_rate(u_in[:, h:h + 1]).sum())
    # units: firing counts and top-k activations
    a = code.reshape(B * T, -1).float()
    st.fires += (a > 0).sum(0).cpu().numpy()
    top = a.topk(min(st.k, a.shape[0]), dim=0)                         # (k, m)
    flat = torch.from_numpy(pos.reshape(-1))
    _merge(st.top_val, st.top_pos, top.values.T.cpu().numpy(), flat[top.indices.T.cpu()].numpy())
    # heads: attention weights, ranked by their lift over uniform attention
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(p)  # (B, K, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    w = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    lift = w * torch.arange(1, T + 1, device=q.device, dtype=w.dtype)[:, None]
    lift = lift.masked_fill(~causal.tril(-1), float("-inf"))            # keys strictly before the query
    lift = lift.transpose(0, 1).reshape(K, -1)                          # (K, B*T*T)
    n = min(st.pairs, max(1, T * (T - 1) // 2 * B))
    best = lift.topk(n, dim=1)
    flat_idx = best.indices.cpu()
    b, i, j = flat_idx // (T * T), (flat_idx // T) % T, flat_idx % T
    new_pos = np.stack([pos[b.numpy(), i.numpy()], pos[b.numpy(), j.numpy()]], axis=-1)   # (K, n, 2)
    new_w = w.transpose(0, 1).reshape(K, -1).gather(1, best.indices).cpu().numpy()
    _merge(st.pair_val, st.pair_pos, best.values.cpu().numpy(), new_pos, (st.pair_w, new_w))
