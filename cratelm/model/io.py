"""Weights from elsewhere into a CrateLM: a strict state-dict load, and the CRATE authors'
checkpoints (nanoGPT-style ``ckpt.pt``: their key names mapped to ours).

Files in cratelm's own formats (the exported model directory, training runs) are read and
written by `cratelm.checkpoints`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from cratelm.config import ModelConfig
from cratelm.model.crate import CrateLM


def load_state(model: CrateLM, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch raises ValueError naming ``where``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise ValueError(f"{where} does not fit the model: missing keys {missing}, unknown keys {unexpected}, "
                         f"mismatched shapes {bad_shape}")
    model.load_state_dict(state)


# ------------------------------------------------------------------ the CRATE authors' checkpoints

_AUTHORS_KEYS = [  # (regex on the authors' key, our key)
    (r"transformer\.wte\.weight", "embed.wte.weight"),
    (r"transformer\.wpe\.weight", "embed.wpe.weight"),
    (r"transformer\.h\.(\d+)\.prenorm_1\.(weight|bias)", r"blocks.\1.ln1.\2"),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.weight", r"blocks.\1.mssa.U.weight"),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blocks.\1.mssa.proj.\2"),
    (r"transformer\.h\.(\d+)\.prenorm_2\.(weight|bias)", r"blocks.\1.ln2.\2"),
    (r"transformer\.h\.(\d+)\.ista\.weight", r"blocks.\1.ista.weight"),
]
_AUTHORS_IGNORED = [r"transformer\.h\.\d+\.attn\.bias", r"lm_head\.weight"]  # causal mask buffer; tied head


def convert_authors_state(state: dict[str, torch.Tensor], model_args: dict[str, Any]) -> tuple[ModelConfig, dict]:
    """Map an authors' CRATE-GPT state dict (nanoGPT names) to a ModelConfig and our names."""
    need = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    lacking = [k for k in need if k not in model_args]
    if lacking:
        raise ValueError(f"authors' checkpoint: model_args lacks {lacking} (has {sorted(model_args)})")
    cfg = ModelConfig(arch="crate-gpt", n_layer=int(model_args["n_layer"]), n_head=int(model_args["n_head"]),
                      d_model=int(model_args["n_embd"]), context=int(model_args["block_size"]),
                      vocab_size=int(model_args["vocab_size"]), vocab_multiple=1, dropout=0.0)  # already padded
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        key = key.removeprefix("_orig_mod.")                      # torch.compile's wrapper
        if any(re.fullmatch(p, key) for p in _AUTHORS_IGNORED):
            continue
        for pattern, repl in _AUTHORS_KEYS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"authors' checkpoint has keys cratelm does not know: {unknown}")
    head = state.get("lm_head.weight", state.get("_orig_mod.lm_head.weight"))
    if head is not None and "embed.wte.weight" in out and not torch.equal(head, out["embed.wte.weight"]):
        raise ValueError("authors' checkpoint: lm_head.weight differs from transformer.wte.weight; "
                         "CRATE-GPT ties them and cratelm cannot load an untied head")
    if not model_args.get("bias", True):
        # nanoGPT's bias=False drops LayerNorm and c_proj biases: zeros are the same function
        for i in range(cfg.n_layer):
            for name, dim in ((f"blocks.{i}.ln1.bias", cfg.d_model), (f"blocks.{i}.ln2.bias", cfg.d_model),
                              (f"blocks.{i}.mssa.proj.bias", cfg.d_model)):
                out.setdefault(name, torch.zeros(dim))
    return cfg, out


def load_crate_gpt_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> CrateLM:
    """Import a checkpoint saved by the authors' CRATE-GPT code (a nanoGPT-style ``ckpt.pt``)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a message naming the file is more useful
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected the authors' format, a dict with 'model' and 'model_args'; got {keys}")
    cfg, state = convert_authors_state(ckpt["model"], dict(ckpt["model_args"]))
    model = CrateLM(cfg, seed=None)
    load_state(model, state, str(path))
    return model.to(device).eval()
