"""A consolidated fp32 model from a DeepSpeed checkpoint (what ``cratelm export`` writes).

Where the weights come from, by the checkpoint's layout (read from its cratelm.json):

- pipeline (stages > 1): the ``layer_XX-*model_states.pt`` files, one per layer; their
  names already are CrateLM names (cratelm.train.pipeline) and are merged. They hold the
  weights in the training dtype (bf16 for a bf16 run: the weights the model computed with).
- ZeRO 1, 2, 3: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (the fp32 master
  weights, reassembled from the optimizer partitions of every rank).
- ZeRO 0: the module state in ``mp_rank_00_model_states.pt`` (fp32 master = model for fp32).

``cratelm.checkpoints.export`` writes the result with ``save_model`` (model.safetensors +
config.json + the tokenizer recorded by the run), which ``cratelm eval`` / ``generate`` load;
``load_from_run`` gives it in memory (``cratelm.checkpoints.load_model`` calls it for a run or
checkpoint directory).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from cratelm.config import model_config_from_dict
from cratelm.train import checkpoint as ckpt
from cratelm.train import safe_load


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.").replace("_orig_mod.", "")
        out[k] = v.detach().to("cpu", torch.float32).contiguous()
    return out


def consolidated_state_dict(path: str | os.PathLike,
                            trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(fp32 CrateLM state dict, the checkpoint's cratelm.json, the checkpoint directory).
    Files are read without unpickling code unless ``trust`` (cratelm.train.safe_load)."""
    tag_dir = ckpt.resolve(path)
    meta = ckpt.read_meta(tag_dir)
    safe_load.check_files(tag_dir, trust)         # before DeepSpeed's readers (weights_only=False) see them
    if meta.get("pipeline_stages", 1) > 1:
        from cratelm.train.pipeline import layer_files_to_crate_state

        files = sorted(glob.glob(str(tag_dir / "layer_*-model_states.pt")) +
                       glob.glob(str(tag_dir / "layer_*-model_*-model_states.pt")))
        if not files:
            raise FileNotFoundError(f"{tag_dir}: pipeline checkpoint without layer_XX-*model_states.pt files")
        states = {}
        for f in sorted(set(files)):
            idx = int(re.match(r"layer_(\d+)", Path(f).name).group(1))  # type: ignore[union-attr]
            states.setdefault(idx, {}).update(safe_load.load(f, trust))
        state = layer_files_to_crate_state(states)
    elif meta.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{tag_dir}: no mp_rank_XX_model_states.pt")
        state = safe_load.load(files[0], trust)["module"]
    return _strip(state), meta, tag_dir


def _tokenizer(meta: dict[str, Any], tag_dir: Path) -> str | None:
    candidates = [meta.get("tokenizer"), tag_dir.parent.parent / "tokenizer.model",
                  tag_dir.parent.parent / "tokenizer.json"]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    return None


def load_from_run(path: str | os.PathLike, device: str | torch.device = "cpu", trust: bool = False):
    """(CrateLM in eval mode with the consolidated fp32 weights, meta) from a run directory or
    checkpoint directory. meta has "model" (ModelConfig as a dict), "tokenizer" (a path or
    None), "tokenizer_sha256", "step" and "checkpoint"."""
    from cratelm.model.crate import CrateLM
    from cratelm.model.io import load_state

    state, meta, tag_dir = consolidated_state_dict(path, trust)
    cfg = model_config_from_dict(meta["model"])
    model = CrateLM(cfg, seed=None)
    load_state(model, state, str(tag_dir))
    info = {"model": meta["model"], "tokenizer": _tokenizer(meta, tag_dir),
            "tokenizer_sha256": meta.get("tokenizer_sha256"), "step": meta.get("step"),
            "checkpoint": str(tag_dir)}
    return model.to(device).eval(), info
