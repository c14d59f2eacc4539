"""Between cratelm's and transformers' weights and configs, and reading a transformers
directory into a CrateLM (no transformers import: config.json and safetensors are read
directly). Used by `cratelm.checkpoints.load_model` (``--checkpoint HF_DIR``) and by
`cratelm.hf.export`.

The transformers side holds the REAL vocabulary: the rows cratelm pads its embedding with (to
a multiple of ``vocab_multiple``, which config.json records) are dropped on export and come
back as zero rows on import, which changes no logit of a real token. GPT-2's Conv1D weights
are cratelm's Linear weights transposed; CRATE weights keep cratelm's names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from cratelm.config import ModelConfig
from cratelm.utils import file_sha256

# cratelm gpt2 name -> transformers GPT2LMHeadModel name (and whether it is a transposed Conv1D)
_GPT2_BLOCK = [("ln1.weight", "ln_1.weight", False), ("ln1.bias", "ln_1.bias", False),
               ("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias", False),
               ("attn.proj.weight", "attn.c_proj.weight", True), ("attn.proj.bias", "attn.c_proj.bias", False),
               ("ln2.weight", "ln_2.weight", False), ("ln2.bias", "ln_2.bias", False),
               ("fc.weight", "mlp.c_fc.weight", True), ("fc.bias", "mlp.c_fc.bias", False),
               ("mlp_proj.weight", "mlp.c_proj.weight", True), ("mlp_proj.bias", "mlp.c_proj.bias", False)]

def gpt2_names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(cratelm key, transformers key, transposed) for every weight of a gpt2-arch model."""
    names = [("embed.wte.weight", "transformer.wte.weight", False),
             ("embed.wpe.weight", "transformer.wpe.weight", False),
             ("ln_f.weight", "transformer.ln_f.weight", False), ("ln_f.bias", "transformer.ln_f.bias", False)]
    for i in range(cfg.n_layer):
        names += [(f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", t) for ours, theirs, t in _GPT2_BLOCK]
    return names


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """cratelm state dict -> the transformers model's (real vocabulary rows only)."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    state["embed.wte.weight"] = state["embed.wte.weight"][: cfg.vocab_size]
    if cfg.arch != "gpt2":
        return {k: v.contiguous() for k, v in state.items()}
    return {theirs: (state[ours].t() if t else state[ours]).contiguous() for ours, theirs, t in gpt2_names(cfg)}


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers state dict -> cratelm's (the embedding padded again with zero rows)."""
    if cfg.arch == "gpt2":
        # the original GPT-2 files name the weights without the "transformer." prefix
        hf = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in hf.items()}
        missing = [theirs for _, theirs, _ in gpt2_names(cfg) if theirs not in hf]
        if missing:
            raise ValueError(f"GPT-2 weights lack {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        state = {ours: (hf[theirs].t() if t else hf[theirs]) for ours, theirs, t in gpt2_names(cfg)}
    else:
        state = dict(hf)
    wte = state["embed.wte.weight"]
    pad = torch.zeros(cfg.padded_vocab - wte.shape[0], wte.shape[1], dtype=wte.dtype)
    state["embed.wte.weight"] = torch.cat([wte, pad])
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A transformers model directory (config.json with a model_type), not a cratelm export."""
    p = Path(path)
    try:
        meta = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta


def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(CrateLM in eval mode, meta) from a transformers directory of a gpt2 or CRATE model;
    reads config.json and the safetensors directly (no transformers, no remote code run)."""
    from safetensors.torch import load_file

    from cratelm.model.crate import CrateLM
    from cratelm.model.io import load_state

    p = Path(path)
    hf = json.loads((p / "config.json").read_text())
    cfg = model_config_from_hf(hf, str(p / "config.json"))
    files = sorted(p.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no model*.safetensors (a transformers directory saved with safetensors)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    weights.pop("lm_head.weight", None)                          # tied to the token embedding
    model = CrateLM(cfg, seed=None)
    load_state(model, from_hf_state(weights, cfg), str(p))
    # cratelm's sentencepiece file if the export has one (the sha256 the shards record), else tokenizer.json
    tok = next((str(p / n) for n in ("tokenizer.model", "tokenizer.json") if (p / n).is_file()), None)
    return model.to(device).eval(), {"model": dataclasses.asdict(cfg), "tokenizer": tok,
                                     "tokenizer_sha256": file_sha256(tok) if tok else None, "imported_from": str(p)}


def model_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """The cratelm ModelConfig of a transformers config.json (model_type gpt2 or crate)."""
    mult = int(hf.get("vocab_multiple", 64))
    if hf.get("model_type") == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function={act!r}; cratelm's gpt2 uses the tanh GELU (gelu_new)")
        d = int(hf["n_embd"])
        inner = hf.get("n_inner") or 4 * d
        if inner % d:
            raise ValueError(f"{where}: n_inner={inner} is not a multiple of n_embd={d}")
        return ModelConfig(arch="gpt2", n_layer=int(hf["n_layer"]), d_model=d, n_head=int(hf["n_head"]),
                           vocab_size=int(hf["vocab_size"]), vocab_multiple=mult, context=int(hf["n_positions"]),
                           mlp_ratio=inner // d, ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    if hf.get("model_type") == "crate":
        return ModelConfig(arch=hf["arch"], n_layer=int(hf["n_layer"]), d_model=int(hf["d_model"]),
                           n_head=int(hf["n_head"]), vocab_size=int(hf["vocab_size"]), vocab_multiple=mult,
                           context=int(hf["context"]), eta=float(hf["eta"]), lmbda=float(hf["lmbda"]),
                           overcomplete=int(hf["overcomplete"]), ista_steps=int(hf["ista_steps"]),
                           ln_eps=float(hf["ln_eps"]))
    raise ValueError(f"{where}: model_type={hf.get('model_type')!r}; cratelm imports gpt2 and crate models")
