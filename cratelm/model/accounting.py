"""Parameter and FLOP counts, from the config alone.

FLOPs per token of one training step (forward + backward) count the matmuls of the
MINIMAL algorithm explicitly: 6 x (multiply-adds per token), plus attention's two
T x T products, 12 x L x d x T (the PaLM / nanoGPT convention: the full T x T square,
not halved for causality). The "6 x parameters" rule undercounts CRATE: its ISTA
dictionary is used twice per token (once as W^T, once as W), and the overcomplete
variants use it 2 x steps times.
"""

from __future__ import annotations

import torch

from cratelm.config import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """``params`` (tied embedding counted once), ``non_embedding_params`` (without wte and wpe)."""
    from cratelm.model.crate import CrateLM

    with torch.device("meta"):
        model = CrateLM(cfg, seed=None)
    total = sum(p.numel() for p in model.parameters())   # parameters() yields a tied tensor once
    emb = model.embed.wte.weight.numel() + model.embed.wpe.weight.numel()
    return {"params": total, "non_embedding_params": total - emb}


def matmul_macs_per_token(cfg: ModelConfig) -> int:
    """Multiply-adds per token of one forward pass, excluding attention's T x T products."""
    d, L = cfg.d_model, cfg.n_layer
    if cfg.arch == "gpt2":
        per_layer = 4 * d * d + 2 * cfg.mlp_ratio * d * d                 # qkv + proj + MLP
    elif cfg.arch == "crate-gpt":
        per_layer = 2 * d * d + 2 * d * d                                 # U, W_o; ISTA (z - zW^T) W
    else:
        m = cfg.overcomplete * d
        # a = zW^T once; each further step c W and (.) W^T; decode c W (or c D^T)
        per_layer = 2 * d * d + m * d * (1 + 2 * (cfg.ista_steps - 1) + 1)
    return L * per_layer + d * cfg.padded_vocab                          # + the LM head


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward + backward model FLOPs per token at sequence length ``seq_len`` (default: context)."""
    T = seq_len or cfg.context
    return 6 * matmul_macs_per_token(cfg) + 12 * cfg.n_layer * cfg.d_model * T


def model_info(cfg: ModelConfig) -> dict[str, int | float | str]:
    """What ``cratelm info`` prints."""
    info: dict[str, int | float | str] = {"arch": cfg.arch, **count_params(cfg)}
    info["flops_per_token"] = flops_per_token(cfg)
    info["forward_flops_per_token"] = info["flops_per_token"] // 3
    info["context"] = cfg.context
    info["padded_vocab"] = cfg.padded_vocab
    return info
