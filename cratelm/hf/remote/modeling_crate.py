"""A CRATE causal language model for transformers, exported by cratelm (imports no cratelm).

Legend: B batch, T new tokens, S tokens seen (cache + new), d width, K heads (subspaces),
p = d / K, m = overcomplete * d dictionary atoms. One layer (Yu et al., arXiv 2311.13110)::

    u  = LN1(x) U^T                          ONE projection: query = key = value
    x' = x + concat_k(softmax(u_k u_k^T / sqrt(p), causal) u_k) W_o^T + b_o
    crate-gpt:   x_next = ReLU(z + eta (z - z W^T) W - eta lambda),  z = LN2(x')
    crate-lm:    c = ISTA steps from 0 against W (m x d);  x_next = c W
    crate-alpha: the same code c;                          x_next = x' + c D^T

then a final LayerNorm (crate-lm, crate-alpha) and a head tied to the token embedding.
Generation caches ONE tensor per layer (u, the keys and the values at once).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_crate import CrateConfig

# transformers >= 5.2x calls the cache `cache`; earlier versions `past_key_values`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CrateCache:
    """ONE cached tensor per layer, u (B, K, S, p), serving as both keys and values."""

    is_compileable = False
    is_croppable = False

    def __init__(self, n_layer: int) -> None:
        self.layers: list[torch.Tensor | None] = [None] * n_layer

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        u = self.layers[layer_idx]
        return 0 if u is None else u.shape[2]

    def update(self, u: torch.Tensor, layer: int) -> torch.Tensor:
        old = self.layers[layer]
        self.layers[layer] = u if old is None else torch.cat([old, u], dim=2)
        return self.layers[layer]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.layers = [None if u is None else u.index_select(0, beam_idx.to(u.device)) for u in self.layers]

    def nbytes(self) -> int:
        return sum(u.numel() * u.element_size() for u in self.layers if u is not None)


class CrateMSSA(nn.Module):
    def __init__(self, config: CrateConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.d_model // config.n_head
        self.U = nn.Linear(config.d_model, config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=True)

    def forward(self, z: torch.Tensor, cache: CrateCache | None, layer: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, d = z.shape
        u = self.U(z).view(B, T, self.n_head, self.head_dim).transpose(1, 2)    # (B, K, T, p)
        u_all = cache.update(u, layer) if cache is not None else u             # (B, K, S, p)
        if mask is None:
            y = F.scaled_dot_product_attention(u, u_all, u_all, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(u, u_all, u_all, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class CrateISTA(nn.Module):
    def __init__(self, config: CrateConfig) -> None:
        super().__init__()
        self.arch, self.eta, self.lmbda, self.steps = config.arch, config.eta, config.lmbda, config.ista_steps
        m = config.overcomplete * config.d_model
        self.weight = nn.Parameter(torch.empty(m, config.d_model))             # the dictionary W
        self.decoder = nn.Linear(m, config.d_model, bias=False) if config.arch == "crate-alpha" else None

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        W, eta, lmbda = self.weight, self.eta, self.lmbda
        if self.arch == "crate-gpt":
            return F.relu(z + eta * ((z - F.linear(z, W)) @ W) - eta * lmbda)
        c = F.relu(eta * F.linear(z, W) - eta * lmbda)                        # (B, T, m)
        for _ in range(self.steps - 1):
            c = F.relu(c + eta * F.linear(z - c @ W, W) - eta * lmbda)
        return c @ W if self.decoder is None else x + self.decoder(c)


class CrateBlock(nn.Module):
    def __init__(self, config: CrateConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.ln_eps)
        self.mssa = CrateMSSA(config)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.ln_eps)
        self.ista = CrateISTA(config)

    def forward(self, x, cache, layer, mask):
        x = x + self.mssa(self.ln1(x), cache, layer, mask)
        return self.ista(self.ln2(x), x)


class CrateEmbedding(nn.Module):
    def __init__(self, config: CrateConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context, config.d_model)


class CratePreTrainedModel(PreTrainedModel):
    config_class = CrateConfig
    base_model_prefix = "crate"
    _no_split_modules = ["CrateBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, CrateISTA):
            bound = (6.0 / module.weight.shape[1]) ** 0.5
            nn.init.uniform_(module.weight, -bound, bound)


class CrateForCausalLM(CratePreTrainedModel, GenerationMixin):
    """logits = head(blocks(embed(ids))); the head is the token embedding (no separate weight)."""

    def __init__(self, config: CrateConfig) -> None:
        super().__init__(config)
        self.embed = CrateEmbedding(config)
        self.blocks = nn.ModuleList([CrateBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.ln_eps) if config.arch != "crate-gpt" else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed.wte = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False          # the model makes its own one-tensor-per-layer CrateCache

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: CrateCache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, CrateCache):
            raise TypeError(f"CRATE caches one tensor per layer (CrateCache); got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = CrateCache(self.config.n_layer)
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        if position_ids is None:
            if attention_mask is not None:      # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, S, device=input_ids.device).unsqueeze(0)
        if int(position_ids.max()) >= self.config.context:
            raise ValueError(f"position {int(position_ids.max())} is past the model's context of "
                             f"{self.config.context} tokens (learned positions)")
        mask = None
        if attention_mask is not None or T != S:
            mask = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(diagonal=S - T)
            if attention_mask is not None:       # (B, 1, T, S); a token always sees itself (no empty rows)
                keep = attention_mask[:, None, None, -S:].bool()
                own = torch.arange(T, device=input_ids.device)
                mask = mask & keep
                mask[:, :, own, own + S - T] = True
        x = self.embed.wte(input_ids) + self.embed.wpe(position_ids)           # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, mask)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.embed.wte.weight)                            # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
