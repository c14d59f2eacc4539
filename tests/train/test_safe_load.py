"""Checkpoint files are loaded without running code from them (cratelm.train.safe_load)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cratelm.train import checkpoint as ckpt
from cratelm.train import safe_load
from .conftest import REPO, base_env


class Payload:
    """Unpickling this object writes a file (what a malicious checkpoint would do)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').write('pwned')",)


def _run_dir(tmp_path: Path, target: Path) -> Path:
    """A ZeRO-0 run directory whose model-states file holds the payload next to real weights."""
    from cratelm.config import ModelConfig
    from cratelm.model.crate import CrateLM

    cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, vocab_size=64, vocab_multiple=64, context=8)
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    import dataclasses

    torch.save({"module": CrateLM(cfg, seed=0).state_dict(), "extra": Payload(target)},
               tag / "mp_rank_00_model_states.pt")
    (tag / ckpt.MARKER).write_text(json.dumps({"complete": True, "step": 1, "zero_stage": 0, "pipeline_stages": 1,
                                               "model": dataclasses.asdict(cfg)}))
    return tmp_path / "run"


def test_a_pickled_payload_is_refused_and_does_not_run(tmp_path):
    from cratelm.train.export import load_from_run

    target = tmp_path / "written-by-the-checkpoint"
    run = _run_dir(tmp_path, target)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt holds builtins\.exec"):
        load_from_run(run)
    assert not target.exists()
    proc = subprocess.run([sys.executable, "-m", "cratelm", "export", str(run), str(tmp_path / "out")],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not target.exists() and not (tmp_path / "out").exists()
    err = [line for line in proc.stderr.splitlines() if "Warning" not in line and line.strip()]
    assert len(err) == 1 and "builtins.exec" in err[0] and "--trust-checkpoint" in err[0], proc.stderr
    # the test can fail: the same file, trusted, does run the payload
    load_from_run(run, trust=True)
    assert target.read_text() == "pwned"


def test_deepspeed_classes_are_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    f = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0), "t": torch.ones(2)}, f)
    got = safe_load.load(f)
    assert got["zero_stage"] == ZeroStageEnum.gradients and torch.equal(got["t"], torch.ones(2))
    safe_load.check_files(tmp_path)
