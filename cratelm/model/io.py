"""Saving and loading models: the exported format, and the CRATE authors' checkpoints.

Exported model (what ``cratelm export`` and ``import-crate-gpt`` write; eval and generate read)::

    DIR/config.json        {"format": "cratelm-model", "version": 1, "model": {ModelConfig fields},
                            "tokenizer": "tokenizer.model" | null, "tokenizer_sha256": str | null, ...}
    DIR/model.safetensors  fp32 state dict of CrateLM (the tied head stored once, as embed.wte.weight)
    DIR/tokenizer.model    a copy of the tokenizer, when known

A directory is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from cratelm.config import ModelConfig, model_config_from_dict
from cratelm.data.tokenizer import file_sha256
from cratelm.model.crate import CrateLM

FORMAT = "cratelm-model"


def atomic_dir(dst: Path, fill) -> None:
    """Call fill(tmp_dir), then move tmp_dir to dst; an existing dst is replaced only at the end."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: CrateLM | dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike,
               tokenizer: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write an exported model directory (fp32 safetensors + config.json [+ tokenizer])."""
    from safetensors.torch import save_file

    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    meta: dict[str, Any] = {"format": FORMAT, "version": 1, "model": dataclasses.asdict(cfg),
                            "tokenizer": None, "tokenizer_sha256": None, **(extra or {})}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        if tokenizer:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            meta["tokenizer"], meta["tokenizer_sha256"] = "tokenizer.model", file_sha256(tokenizer)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    atomic_dir(Path(out_dir), fill)
    return Path(out_dir)


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CrateLM, dict]:
    """Load an exported model directory; returns (model in eval mode, config.json dict)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}/config.json is not a cratelm model (format={meta.get('format')!r})")
    cfg = model_config_from_dict(meta["model"])
    model = CrateLM(cfg, seed=None)
    _load_state(model, load_file(str(path / "model.safetensors")), str(path / "model.safetensors"))
    if meta.get("tokenizer"):
        meta["tokenizer"] = str(path / meta["tokenizer"])
    return model.to(device).eval(), meta


def _load_state(model: CrateLM, state: dict[str, torch.Tensor], where: str) -> None:
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
    _load_state(model, state, str(path))
    return model.to(device).eval()


def import_crate_gpt(src: str | os.PathLike, dst: str | os.PathLike, tokenizer: str | None = None) -> Path:
    """``cratelm import-crate-gpt SRC DST``: the authors' checkpoint -> an exported model directory."""
    model = load_crate_gpt_checkpoint(src)
    return save_model(model, model.cfg, dst, tokenizer=tokenizer,
                      extra={"imported_from": str(src), "source_sha256": file_sha256(src)})


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CrateLM, dict]:
    """Load any model cratelm knows: an exported directory, a training run/checkpoint
    directory, or an authors' CRATE-GPT ``.pt`` file. Returns (model, metadata)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return load_exported(p, device)
    if p.is_dir():
        from cratelm.train.export import load_from_run  # a DeepSpeed checkpoint directory

        return load_from_run(p, device)
    if p.is_file():
        model = load_crate_gpt_checkpoint(p, device)
        return model, {"model": dataclasses.asdict(model.cfg), "tokenizer": None, "tokenizer_sha256": None,
                       "imported_from": str(p)}
    raise FileNotFoundError(f"{path}: no such model (expected an exported directory, a run directory "
                            "or an authors' .pt checkpoint)")
