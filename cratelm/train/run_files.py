"""The files of a run directory besides checkpoints and metrics: the resolved config, the
DeepSpeed config, a copy of the tokenizer, and ``status.json`` (replaced atomically; for
launchers that swallow exit codes). Global rank 0 writes them."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cratelm.config import JobConfig, dumps
from cratelm.train import checkpoint as ckpt


def write_run_files(run_dir: Path, cfg: JobConfig, ds_config: dict[str, Any], tokenizer: Path | None) -> None:
    """config.yaml, ds_config.json and the tokenizer (copied when it differs)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dumps(cfg))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    if tokenizer is not None:
        dst = run_dir / tokenizer.name         # tokenizer.model, or tokenizer.json
        if not dst.exists() or dst.read_bytes() != tokenizer.read_bytes():
            shutil.copyfile(tokenizer, dst)


def write_status(run_dir: Path, status: str, step: int, code: int | None = None, checkpoint: Path | None = None,
                 error: str | None = None) -> None:
    """status.json: running / finished / nan / preempted / error, the step, the exit code and
    the checkpoint to resume from (``checkpoint``, else the newest complete one)."""
    latest = checkpoint or ckpt.latest_checkpoint(run_dir / ckpt.CKPT_DIR)
    body = {"status": status, "step": step, "exit_code": code,
            "checkpoint": str(latest) if latest else None, "time": datetime.datetime.now().isoformat()}
    if error:
        body["error"] = error
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, run_dir / "status.json")
