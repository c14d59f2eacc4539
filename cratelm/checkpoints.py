"""Models on disk: the exported format, and loading any model cratelm knows.

Exported model (what ``cratelm export`` and ``import-crate-gpt`` write; eval and generate read)::

    DIR/config.json        {"format": "cratelm-model", "version": 1, "model": {ModelConfig fields},
                            "tokenizer": "tokenizer.model" | null, "tokenizer_sha256": str | null, ...}
    DIR/model.safetensors  fp32 state dict of CrateLM (the tied head stored once, as embed.wte.weight)
    DIR/tokenizer.model    a copy of the tokenizer, when known

A directory is written under a temporary name and renamed into place when complete.
`load_model` reads an exported directory, a training run / checkpoint directory
(`cratelm.train.export.load_from_run`) or an authors' CRATE-GPT ``.pt`` file
(`cratelm.model.io.load_crate_gpt_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cratelm.config import ModelConfig, model_config_from_dict
from cratelm.model.crate import CrateLM
from cratelm.model.io import load_crate_gpt_checkpoint, load_state
from cratelm.utils import file_sha256

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
            name = "tokenizer.json" if str(tokenizer).endswith(".json") else "tokenizer.model"
            shutil.copyfile(tokenizer, tmp / name)
            meta["tokenizer"], meta["tokenizer_sha256"] = name, file_sha256(tokenizer)
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
    load_state(model, load_file(str(path / "model.safetensors")), str(path / "model.safetensors"))
    if meta.get("tokenizer"):
        meta["tokenizer"] = str(path / meta["tokenizer"])
    return model.to(device).eval(), meta


def import_crate_gpt(src: str | os.PathLike, dst: str | os.PathLike, tokenizer: str | None = None) -> Path:
    """``cratelm import-crate-gpt SRC DST``: the authors' checkpoint -> an exported model directory."""
    model = load_crate_gpt_checkpoint(src)
    return save_model(model, model.cfg, dst, tokenizer=tokenizer,
                      extra={"imported_from": str(src), "source_sha256": file_sha256(src)})


def export(path: str | os.PathLike, out_dir: str | os.PathLike, trust: bool = False) -> Path:
    """``cratelm export``: the exported model directory of the training checkpoint ``path``
    (a run directory: its latest complete checkpoint) written to ``out_dir``. ``trust``:
    unpickle any class its files hold (cratelm.train.safe_load)."""
    from cratelm.train.export import load_from_run

    model, info = load_from_run(path, trust=trust)
    return save_model(model, model.cfg, out_dir, tokenizer=info["tokenizer"],
                      extra={"source_checkpoint": info["checkpoint"], "step": info["step"]})


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               trust: bool = False) -> tuple[CrateLM, dict]:
    """Load any model cratelm knows: an exported directory, a training run/checkpoint
    directory, an authors' CRATE-GPT ``.pt`` file, or a Hugging Face directory (gpt2 or a
    cratelm CRATE export: `cratelm.hf.convert.load_hf`). Returns (model, metadata). ``trust``:
    unpickle any class a run directory's files hold (cratelm.train.safe_load)."""
    from cratelm.hf.convert import is_hf_dir, load_hf   # (imports no transformers)

    p = Path(path)
    if is_hf_dir(p):                                    # a Hugging Face transformers directory
        return load_hf(p, device)
    if p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return load_exported(p, device)
    if p.is_dir():
        from cratelm.train.export import load_from_run  # a DeepSpeed checkpoint directory

        return load_from_run(p, device, trust)
    if p.is_file():
        model = load_crate_gpt_checkpoint(p, device)
        return model, {"model": dataclasses.asdict(model.cfg), "tokenizer": None, "tokenizer_sha256": None,
                       "imported_from": str(p)}
    raise FileNotFoundError(f"{path}: no such model (expected an exported directory, a run directory "
                            "or an authors' .pt checkpoint)")
