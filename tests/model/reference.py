"""A reference CRATE / GPT-2 forward pass written from the equations in
shared/design/crate-model.md, independent of cratelm.model: plain float64 tensor math on a
dict of named weights (cratelm's names; test_import maps the authors' names onto them)."""

from __future__ import annotations

import math

import torch


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def causal_softmax_attention(q, k, v):
    T, p = q.shape[-2], q.shape[-1]
    s = q @ k.transpose(-1, -2) / math.sqrt(p)
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(s, -1) @ v


def heads(x, K):
    B, T, d = x.shape
    return x.view(B, T, K, d // K).transpose(1, 2)


def merge(y):
    B, K, T, p = y.shape
    return y.transpose(1, 2).reshape(B, T, K * p)


def forward(sd: dict[str, torch.Tensor], idx: torch.Tensor, arch: str, n_layer: int, n_head: int,
            eta: float = 0.1, lmbda: float = 0.1, steps: int = 1, rename=None) -> torch.Tensor:
    """Logits (B, T, V) in float64; ``rename`` maps cratelm's weight names to those in ``sd``."""
    sd = {k: v.double() for k, v in sd.items()}
    if rename is not None:
        sd = {ours: sd[theirs] for ours, theirs in rename.items() if theirs in sd}
    T = idx.shape[1]
    x = sd["embed.wte.weight"][idx] + sd["embed.wpe.weight"][:T]
    for i in range(n_layer):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        z = layer_norm(x, g("ln1.weight"), g("ln1.bias"))
        if arch == "gpt2":
            q, k, v = (z @ g("attn.qkv.weight").T + g("attn.qkv.bias")).split(x.shape[-1], -1)
            y = causal_softmax_attention(heads(q, n_head), heads(k, n_head), heads(v, n_head))
            x = x + merge(y) @ g("attn.proj.weight").T + g("attn.proj.bias")
            h = layer_norm(x, g("ln2.weight"), g("ln2.bias")) @ g("fc.weight").T + g("fc.bias")
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
            x = x + h @ g("mlp_proj.weight").T + g("mlp_proj.bias")
            continue
        u = heads(z @ g("mssa.U.weight").T, n_head)                    # q = k = v = u
        x = x + merge(causal_softmax_attention(u, u, u)) @ g("mssa.proj.weight").T + g("mssa.proj.bias")
        z = layer_norm(x, g("ln2.weight"), g("ln2.bias"))
        W = g("ista.weight")
        if arch == "crate-gpt":   # ReLU(z + eta (z W - z W^T W) - eta lambda), written as three products
            x = torch.relu(z + eta * (z @ W - z @ W.T @ W) - eta * lmbda)
            continue
        a = z @ W.T
        c = torch.relu(eta * a - eta * lmbda)
        for _ in range(steps - 1):
            c = torch.relu(c + eta * (a - c @ W @ W.T) - eta * lmbda)
        x = c @ W if arch == "crate-lm" else x + c @ g("ista.decoder.weight").T
    if arch != "crate-gpt":
        x = layer_norm(x, sd["ln_f.weight"], sd["ln_f.bias"])
    return x @ sd["embed.wte.weight"].T
