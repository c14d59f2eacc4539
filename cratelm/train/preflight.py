"""Everything a training job checks before its process group starts: the batch plan, the
DeepSpeed config, the data, and the checkpoint to resume from. Every problem is a
ConfigError with the numbers, so ``cratelm train`` exits 2 in a second.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cratelm.config import BatchPlan, ConfigError, JobConfig
from cratelm.data.loading import Data, open_data
from cratelm.train import checkpoint as ckpt
from cratelm.train.ds_config import check_job, device_type, ds_config
from cratelm.train.engine import dist_env

IMPL_FIELDS = ("attn_backend", "ista_impl", "loss_impl")   # kernels may change on resume; weights may not


def resolve_resume(resume: str | None, run_dir: str) -> Path | None:
    """``auto``: the newest complete checkpoint of run_dir, or None (fresh start);
    a path: that checkpoint / run directory (must hold a complete checkpoint); None: fresh,
    refused if run_dir already holds checkpoints (pass --resume auto to continue)."""
    root = Path(run_dir) / ckpt.CKPT_DIR
    if resume is None or resume == "none":
        found = ckpt.latest_checkpoint(root)
        if found is not None:
            raise ConfigError(f"train.run_dir={run_dir} already holds checkpoints (newest: {found.name}); "
                              "pass --resume auto to continue it, or choose another train.run_dir")
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(root)
    try:
        return ckpt.resolve(resume)
    except FileNotFoundError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None


def check_resumable(meta: dict, cfg: JobConfig, where: Path) -> None:
    old, new = dict(meta["model"]), dataclasses.asdict(cfg.model)
    diff = {k: (old.get(k), new.get(k)) for k in new if k not in IMPL_FIELDS and old.get(k) != new.get(k)}
    if diff:
        raise ConfigError(f"{where} holds a different model: " +
                          ", ".join(f"model.{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items()))


def prepare(cfg: JobConfig, resume: str | None = None, world_size: int | None = None,
            local_rank: int | None = None) -> tuple[BatchPlan, dict, Data, Path | None]:
    """Everything before the process group: checks, batch plan, DeepSpeed config, data, resume
    point. Raises ConfigError with the numbers."""
    env = dist_env(local_rank)
    dev = device_type()
    plan = check_job(cfg, world_size or env.world_size, dev)
    config = ds_config(cfg, plan, dev)
    data = open_data(cfg)
    point = resolve_resume(resume, cfg.train.run_dir)
    if point is not None:
        check_resumable(ckpt.read_meta(point), cfg, point)
    return plan, config, data, point
