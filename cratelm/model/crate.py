"""The CRATE language model (and the GPT-2 baseline in the same shell).

Legend: B batch, T tokens, d width, K heads (subspaces), p = d / K, V padded vocabulary.

A CRATE block is one step of sparse rate reduction (Yu et al., JMLR, arXiv 2311.13110)::

    x' = x + MSSA(LN1(x))          compress the tokens against K learned subspaces
    x_next = ISTA(LN2(x'))         sparsify them against a learned dictionary

The model: token embedding + LEARNED position embedding -> L blocks -> (a final
LayerNorm for crate-lm, crate-alpha and gpt2; none for crate-gpt, as the authors' code)
-> a head tied to the token embedding, without bias.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from cratelm.config import ModelConfig
from cratelm.kernels.loss import lm_head_loss
from cratelm.model.gpt2 import GPT2Block
from cratelm.model.ista import ISTA
from cratelm.model.generate import TokenCache, sample_next
from cratelm.model.mssa import MSSA


class CrateBlock(nn.Module):
    """x' = x + MSSA(LN1(x)); x_next = ISTA(LN2(x')) (no residual around ISTA for crate-gpt)."""

    cache_tensors = 1  # q = k = v: one cached tensor per layer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mssa = MSSA(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.ista = ISTA(cfg)

    def residual_projections(self) -> list[nn.Linear]:
        """Projections into the residual stream (initialised with std / sqrt(2L), as the authors)."""
        return [self.mssa.proj] + ([self.ista.decoder] if self.ista.decoder is not None else [])

    def forward(self, x: torch.Tensor, cache: TokenCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.mssa(self.ln1(x), cache, layer)
        return self.ista(self.ln2(x), x)


def make_block(cfg: ModelConfig) -> nn.Module:
    """One block of the configured architecture (the pipeline adapter builds them one by one)."""
    return GPT2Block(cfg) if cfg.arch == "gpt2" else CrateBlock(cfg)


def init_block(block: nn.Module, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    """The authors' init: Linear N(0, std), biases 0, LayerNorm (1, 0), residual projections
    N(0, std / sqrt(2L)), the ISTA dictionary kaiming-uniform."""
    for mod in block.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, cfg.init_std, generator=generator)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, ISTA):
            mod.reset_parameters(generator)
    for proj in block.residual_projections():
        nn.init.normal_(proj.weight, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer), generator=generator)


def _generator(seed: int | None, offset: int) -> torch.Generator | None:
    # each module gets its own stream, so a pipeline stage that builds only its own blocks
    # initialises them exactly as the whole model would
    return None if seed is None else torch.Generator().manual_seed(seed * 1_000_003 + offset)


class Embedding(nn.Module):
    """Token embedding (V x d, also the tied head) plus a learned position embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.context = cfg.context

    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.wte.weight, 0.0, std, generator=generator)
        nn.init.normal_(self.wpe.weight, 0.0, std, generator=generator)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = idx.shape[1]
        if start + T > self.context:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.context={self.context}")
        pos = torch.arange(start, start + T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))         # (B, T, d)


class CrateLM(nn.Module):
    """CRATE causal LM (arch crate-gpt / crate-lm / crate-alpha) or the GPT-2 baseline (arch gpt2).

    ``model(idx)`` returns logits (B, T, V) over the padded vocabulary, as the authors' code;
    ``model(idx, targets)`` returns the mean cross-entropy without keeping the logits.
    """

    def __init__(self, cfg: ModelConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleDict({str(i): make_block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps) if cfg.arch != "crate-gpt" else None
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic per-module init (independent of how the model is split over devices)."""
        self.embed.reset_parameters(self.cfg.init_std, _generator(seed, 0))
        for i, block in self.blocks.items():
            init_block(block, self.cfg, _generator(seed, 1 + int(i)))
        if self.ln_f is not None:
            self.ln_f.reset_parameters()

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head, tied to the token embedding (V x d)."""
        return self.embed.wte.weight

    def hidden(self, idx: torch.Tensor, cache: TokenCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, d) that the head reads."""
        x = self.embed(idx, start=cache.pos if cache is not None else 0)
        for i, block in self.blocks.items():
            x = block(x, cache, int(i))
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.ln_f(x) if self.ln_f is not None else x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(idx)
        if targets is None:
            return F.linear(h, self.head_weight)                   # (B, T, V)
        return lm_head_loss(h, self.head_weight, targets, impl=self.cfg.loss_impl)

    def new_cache(self, batch: int, max_len: int | None = None) -> TokenCache:
        """A cache for ``batch`` sequences: ONE tensor per layer for CRATE, two for gpt2."""
        blk = next(iter(self.blocks.values()))
        p = self.head_weight
        return TokenCache(self.cfg.n_layer, blk.cache_tensors, batch, self.cfg.n_head,
                          max_len or self.cfg.context, self.cfg.head_dim, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); temperature 0 is greedy."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, use_cache, generator))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the new tokens (B, 1) one at a time.

        With ``use_cache`` each new token costs one token's forward pass; past
        ``context`` tokens the window slides and the cache is rebuilt from the last
        ``context`` tokens (learned positions cannot be shifted).
        """
        cache = None
        for _ in range(max_new_tokens):
            window = idx[:, -self.cfg.context:]
            if not use_cache:
                h = self.hidden(window)
            elif cache is None or cache.pos + 1 > self.cfg.context or idx.shape[1] > self.cfg.context:
                cache = self.new_cache(idx.shape[0])
                h = self.hidden(window, cache)                      # prefill
            else:
                h = self.hidden(idx[:, -1:], cache)                 # one new token
            logits = F.linear(h[:, -1], self.head_weight)[:, : self.cfg.vocab_size]
            nxt = sample_next(logits, temperature, top_k, generator)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt
