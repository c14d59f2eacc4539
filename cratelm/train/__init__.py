"""Training through DeepSpeed: the loop (trainer.py: the cadence), one optimizer step and the
process group (engine.py), the checks before it (preflight.py, ds_config.py), the optimizer
(optimizer.py), the pipeline adapter (pipeline.py), checkpoints (checkpoint.py), the LR
schedule (schedule.py), logging (metrics.py), the run directory's files (run_files.py) and
the consolidated model of a checkpoint (export.py).

    import cratelm.train
    trainer = cratelm.train.train(cfg, resume="auto")     # cfg: a cratelm.config.JobConfig
    trainer.exit_code                                     # 0 finished, 3 NaN, 75 preempted

Nothing here is imported by the model code, and importing this package imports no
DeepSpeed (a heavy import): the modules are loaded when a job runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cratelm.config import JobConfig
    from cratelm.train.trainer import Trainer


def train(cfg: JobConfig, resume: str | None = None, verbose: bool = False) -> Trainer:
    """`cratelm.train.trainer.train`: check, start the process group if needed, train; the
    Trainer's ``exit_code`` says how it ended. Raises ConfigError before any process group."""
    from cratelm.train.trainer import train as run

    return run(cfg, resume, verbose)
