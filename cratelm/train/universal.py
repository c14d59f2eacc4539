"""Resume on another layout through DeepSpeed's universal checkpoints.

A DeepSpeed checkpoint can only be loaded by the layout that wrote it (world size, ZeRO
stage, pipeline stages): its optimizer state is cut into one flat partition per rank.
DeepSpeed's own answer is the *universal checkpoint*: ``ds_to_universal`` reassembles every
parameter's fp32 weight and Adam moments into one file per parameter and state
(``zero/NAME/{fp32,exp_avg,exp_avg_sq,step}.pt``), and an engine configured with
``"checkpoint": {"load_universal": true}`` slices them again for its own layout. cratelm
converts a checkpoint the first time a job with another layout resumes from it (or when
``cratelm convert-checkpoint`` is run) into ``step_XXXXXXXX/universal/`` and loads that.

What cratelm adds around DeepSpeed 0.19.8 (each a naming issue, no resharding of ours):

- ``universal_checkpoint_info`` in the client state of every save: for a pipeline, the
  tied embedding's copies on later stages (``tied_modules.*``) are *pipeline-replicated*,
  so ``ds_to_universal`` takes stage 0's copy (the last stage also holds a never-trained
  ``wpe`` in its copy of the embedding module, which must not win).
- Parameter names: a pipeline engine names parameters ``{layer}.blocks.{i}.*`` and
  ``tied_modules.embed.embed.*``, a plain engine ``blocks.{i}.*`` and ``embed.*``. The
  converted directory holds CrateLM names; a pipeline target gets links under its names.
- The model-states file: the loader looks for ``zero_pp_rank_0_mp_rank_XX_model_states.pt``
  under ZeRO-3 and ``mp_rank_XX_model_states.pt`` otherwise, while ``ds_to_universal``
  copies the source's files as they are; the other name is linked.
- DeepSpeed's ZeRO-3 universal loader gives every parameter group the hyperparameters of
  group 0 (weight decay on LayerNorm weights and biases) and every partition one shared
  Adam ``step`` tensor (torch's AdamW increments it in place once per partition, so the
  bias correction runs ahead): ``load`` puts the groups back and gives each its own step.
- The universal ``zero/optimizer_state.pt`` holds the keys of the source's ZeRO stage only;
  cratelm adds the other loader's (``optimizer_state_dict`` with the step for ZeRO-3,
  ``ds_version`` for ZeRO-1/2). From a ZeRO-3 source the per-parameter files are flat
  tensors without a ``step.pt``, which the ZeRO-1/2 loader needs as ``{"param": tensor}``
  in the parameter's shape (from the source's ``param_shapes``) and a step file: added.

What cannot work, and why (refused before any process group, with this reason):

- A ZeRO-0 source: ``ds_to_universal`` reads the ZeRO optimizer partitions
  (``*_optim_states.pt``); a ZeRO-0 engine writes its optimizer state inside
  ``mp_rank_00_model_states.pt`` and none of those files.
- A ZeRO-0 target: ``load_universal`` restores the weights through the ZeRO (or bf16)
  optimizer only; an fp32 ZeRO-0 engine would keep its initial weights.
- A pipeline source whose layer files leave fewer transformer layers than stages between
  the first and last ``layer_XX`` file (e.g. 2 blocks without a final LayerNorm on 2
  stages): DeepSpeed's ``DeepSpeedCheckpoint`` assumes Megatron's layout and divides by
  zero there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from cratelm.train.durable import fsync_dir, fsync_tree, write_atomic

UNIVERSAL = "universal"          # = checkpoint.UNIVERSAL_DIR
DONE = "cratelm-universal.json"
LAYOUT_KEYS = ("world_size", "pipeline_stages", "zero_stage")
_PIPE_PREFIX = re.compile(r"^(\d+\.|tied_modules\.embed\.)")


def client_state() -> dict[str, Any]:
    """The ``universal_checkpoint_info`` entry every save puts in DeepSpeed's client state."""
    from deepspeed.checkpoint.constants import (PIPELINE_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
                                        PIPELINE_REPLICATED_PARAMETER_PATTERNS: [r"tied_modules\..*"]}}


def describe_change(saved: dict[str, Any], layout: dict[str, Any]) -> str:
    """``world size 2 -> 1, ZeRO stage 2 -> 1`` (empty when nothing changed)."""
    names = {"world_size": "world size", "pipeline_stages": "pipeline stages", "zero_stage": "ZeRO stage"}
    return ", ".join(f"{names[k]} {saved.get(k)} -> {layout[k]}" for k in LAYOUT_KEYS if saved.get(k) != layout[k])


def needs_universal(saved: dict[str, Any], layout: dict[str, Any]) -> bool:
    """True when DeepSpeed cannot load ``saved``'s files directly into ``layout``. ZeRO-0
    without a pipeline keeps whole weights and optimizer state in one file: any world size."""
    if all(saved.get(k) == layout[k] for k in LAYOUT_KEYS):
        return False
    return not (saved.get("zero_stage") == 0 == layout["zero_stage"]
                and saved.get("pipeline_stages") == 1 == layout["pipeline_stages"])


def check_convertible(path: Path, meta: dict[str, Any], layout: dict[str, Any]) -> None:
    """Raise ValueError saying why ``meta``'s checkpoint cannot resume on ``layout``."""
    change = "another layout" if None in layout.values() else describe_change(meta, layout)
    if meta.get("zero_stage", 0) == 0:
        raise ValueError(f"{path} was written by a ZeRO-0 job; resuming it on {change} needs a DeepSpeed universal "
                         "checkpoint, which ds_to_universal builds from the ZeRO optimizer partitions "
                         "(*_optim_states.pt) that ZeRO-0 does not write. Resume with zero_stage=0 and "
                         f"pipeline_stages={meta.get('pipeline_stages')}, or train with zero_stage >= 1")
    if layout["zero_stage"] == 0:
        raise ValueError(f"{path}: resuming on {change} goes through a DeepSpeed universal checkpoint, which only a "
                         "ZeRO optimizer can load (an fp32 ZeRO-0 engine would keep its initial weights): use "
                         "train.zero_stage >= 1")
    if meta.get("pipeline_stages", 1) > 1:
        if not meta.get("universal_checkpoint_info"):
            raise ValueError(f"{path} is a pipeline checkpoint written before cratelm stored DeepSpeed's "
                             "universal_checkpoint_info: without it ds_to_universal would take the last stage's "
                             "untrained copy of the tied embedding module; resume it on its own layout")
        files = list(path.glob("layer_*-model_states.pt"))
        if len(files) - 2 < meta["pipeline_stages"]:
            raise ValueError(f"{path}: DeepSpeed 0.19.8 cannot convert this pipeline checkpoint to a universal one: "
                             f"its DeepSpeedCheckpoint assumes Megatron's layer layout and needs at least "
                             f"{meta['pipeline_stages']} layer files between the first and the last "
                             f"(there are {len(files)} in all)")


def canonical(name: str) -> str:
    """A pipeline engine's parameter name -> the CrateLM name (plain names are unchanged)."""
    return _PIPE_PREFIX.sub("", name, count=1)


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / UNIVERSAL / DONE).is_file()


def convert(path: str | os.PathLike, meta: dict[str, Any], quiet: bool = True) -> Path:
    """Build ``path/universal`` (a universal checkpoint with CrateLM parameter names) from
    the complete cratelm checkpoint ``path`` (``meta``: its cratelm.json), unless it exists.
    Complete-or-invisible: written under a temporary name and renamed. Returns the directory."""
    from deepspeed.checkpoint import ds_to_universal

    path = Path(path)
    out = path / UNIVERSAL
    if is_converted(path):
        return out
    tmp = path / f".{UNIVERSAL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext(), \
            contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
        ds_to_universal.main(args)
    (path / "latest_universal").unlink(missing_ok=True)       # ds_to_universal's pointer at the tmp name
    zero = tmp / "zero"
    _serve_every_stage(zero)
    for d in sorted(zero.iterdir()):
        if d.is_dir() and canonical(d.name) != d.name:
            d.rename(zero / canonical(d.name))
    # the model-states file under both of the loader's names (ZeRO-3 and ZeRO-1/2 targets)
    for f in sorted(tmp.glob("*model_states.pt")):
        m = re.fullmatch(r"(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_model_states\.pt", f.name)
        if m:
            mp = m.group(1)
            for alias in (f"mp_rank_{mp}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp}_model_states.pt"):
                if not (tmp / alias).exists():
                    os.link(f, tmp / alias)
    write_atomic(tmp / DONE, (json.dumps({"source": path.name, "step": meta.get("step"),
                                                 "layout": {k: meta.get(k) for k in LAYOUT_KEYS}}) + "\n").encode())
    fsync_tree(tmp)
    os.replace(tmp, out)
    fsync_dir(path)
    return out


def _serve_every_stage(zero: Path) -> None:
    """One ``zero/optimizer_state.pt`` for both of DeepSpeed's universal loaders: ds_to_universal
    writes the ZeRO-1/2 loader's keys (top-level ``param_groups``, ``ds_version``) from a ZeRO-1/2
    source and the ZeRO-3 loader's (``optimizer_state_dict`` with a step) from a ZeRO-3 source."""
    import deepspeed
    import torch

    from cratelm.train.safe_load import load as safe_load

    f = zero / "optimizer_state.pt"
    sd = safe_load(f)
    sd.setdefault("ds_version", deepspeed.__version__)
    if "optimizer_state_dict" not in sd:
        step = safe_load(next(zero.glob("*/step.pt")))
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    else:       # a ZeRO-3 source: flat tensors and no step file, which the ZeRO-1/2 loader needs
        shapes: dict[str, Any] = {}
        for m in zero.parent.glob("*model_states.pt"):
            for group in safe_load(m).get("param_shapes", []):
                shapes.update(group)
        step = sd["optimizer_state_dict"]["state"][0]["step"]
        for d in (d for d in zero.iterdir() if d.is_dir() and not (d / "step.pt").exists()):
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                t = safe_load(d / f"{key}.pt")
                if isinstance(t, torch.Tensor):
                    torch.save({"param": t.view(shapes[d.name])}, d / f"{key}.pt")
            torch.save(step.clone() if isinstance(step, torch.Tensor) else step, d / "step.pt")
    buf = io.BytesIO()
    torch.save(sd, buf)
    write_atomic(f, buf.getvalue())


def link_target_names(universal_dir: Path, names: list[str]) -> None:
    """Make ``zero/NAME`` exist for each of this engine's parameter names (a pipeline's)."""
    zero = universal_dir / "zero"
    for name in names:
        want, have = zero / name, zero / canonical(name)
        if want != have and not want.exists():
            if not have.is_dir():
                raise FileNotFoundError(f"{universal_dir}: no state for parameter {canonical(name)}")
            with contextlib.suppress(FileExistsError):     # another rank of this stage made it
                os.symlink(have.name, want)


def engine_param_names(ds_engine) -> list[str]:
    return [n for n, _ in ds_engine.module.named_parameters()]


def load(engine, path: Path, meta: dict[str, Any]) -> None:
    """Load the universal checkpoint of ``path`` (converted, if needed, by global rank 0)
    into ``engine`` (an engine built with ``checkpoint.load_universal``)."""
    import torch

    from cratelm.dist import barrier, broadcast_object, rank

    err = None
    if rank() == 0:
        try:
            convert(path, meta)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, not hang in a barrier
            err = f"converting {path} to a DeepSpeed universal checkpoint failed: {type(e).__name__}: {e}"
    err = broadcast_object(err, src=0)
    if err:
        raise RuntimeError(err)
    out = path / UNIVERSAL
    link_target_names(out, engine_param_names(engine.ds))
    barrier()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.ds.optimizer.param_groups]
    load_path, _ = engine.ds.load_checkpoint(str(path), tag=UNIVERSAL, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {out}")
    for g, saved in zip(engine.ds.optimizer.param_groups, groups):
        g.update({k: v for k, v in saved.items() if k != "lr"})   # the trainer sets lr every step
    for st in engine.optimizer.state.values():
        # DeepSpeed's ZeRO-3 loader gives every partition the SAME step tensor, which torch's
        # AdamW then increments once per partition and step: the bias correction runs ahead
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].clone()
