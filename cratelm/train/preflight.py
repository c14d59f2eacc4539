"""Everything a training job checks before its process group starts: the batch plan, the
DeepSpeed config, the data, and the checkpoint to resume from. Every problem is a
ConfigError with the numbers, so ``cratelm train`` exits 2 in a second.
"""

from __future__ import annotations

from pathlib import Path

from cratelm.config import BatchPlan, JobConfig
from cratelm.data.loading import Data, open_data
from cratelm.train import resume as resume_checks
from cratelm.train import validation
from cratelm.train.ds_config import check_job, device_type, ds_config
from cratelm.train.engine import dist_env


def prepare(cfg: JobConfig, resume: str | None = None, world_size: int | None = None,
            local_rank: int | None = None, discard_newer: bool = False) -> tuple[BatchPlan, dict, Data, Path | None]:
    """Everything before the process group: checks, batch plan, DeepSpeed config, data, resume
    point (cratelm.train.resume: layout changes go through a universal checkpoint). Raises
    ConfigError with the numbers."""
    env = dist_env(local_rank)
    dev = device_type()
    plan = check_job(cfg, world_size or env.world_size, dev)
    config = ds_config(cfg, plan, dev)
    resume_checks.check_run_dir(cfg.train.run_dir)
    data = open_data(cfg)
    resume_checks.check_val_tokenizer(data)
    validation.check(cfg.train.eval_windows, plan.micro_batch, plan.dp_size, cfg.train.pipeline_stages > 1)
    point = resume_checks.find(resume, cfg.train.run_dir, discard_newer)
    if point is not None:
        layout = {"world_size": world_size or env.world_size, "pipeline_stages": cfg.train.pipeline_stages,
                  "zero_stage": config.get("zero_optimization", {}).get("stage", cfg.train.zero_stage)}
        config = resume_checks.configure(config, resume_checks.check_point(point, cfg, data, layout))
        if discard_newer:
            resume_checks.set_aside_newer(point)
    return plan, config, data, point
