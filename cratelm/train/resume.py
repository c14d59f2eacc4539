"""Where a job starts, decided before any process group: every check that can refuse a
resume runs here, so a bad run directory or checkpoint fails in a second with one line
(ConfigError, exit 2) instead of a traceback from every rank.

- ``train.run_dir`` must be a writable directory (created if missing).
- ``--resume auto``: the newest complete checkpoint; one whose marker exists but cannot be
  read is skipped with a warning and kept (cratelm.train.checkpoint). No ``--resume``: a run
  directory that holds any checkpoint (complete or unreadable) is refused.
- ``--resume PATH`` of an older checkpoint while newer ones exist: refused unless
  ``--discard-newer``, which moves the newer ones aside (``step_X.superseded``), never
  deleting them.
- The checkpoint must hold the same model, the same training windows (corpus, context,
  weights, seed) and the same tokenizer; its files must match their manifest.
- The validation shard must come from the training data's tokenizer.
- A layout change (world size, ZeRO stage, pipeline stages) goes through a DeepSpeed
  universal checkpoint (cratelm.train.universal): checked here, announced, and the engine
  is configured to load one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from cratelm.config import ConfigError, JobConfig
from cratelm.train import checkpoint as ckpt
from cratelm.train import universal

IMPL_FIELDS = ("attn_backend", "ista_impl", "loss_impl")   # kernels may change on resume; weights may not


@dataclasses.dataclass
class ResumePoint:
    path: Path | None
    layout_change: str = ""          # "" = same layout (or none needed)
    universal: bool = False


def check_run_dir(run_dir: str) -> None:
    """Create ``run_dir`` if needed and prove it writable (a file created and removed)."""
    p = Path(run_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cratelm-write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"train.run_dir={run_dir} is not a writable directory ({e.strerror or e})") from None


def check_val_tokenizer(data) -> None:
    """The validation shard must be tokenized like the training data."""
    if data.val is None:
        return
    want = data.train.corpora[0]
    for c in data.val.corpora:
        if c.meta.get("tokenizer_sha256") != want.meta.get("tokenizer_sha256"):
            raise ConfigError(f"data.val: {c.bin_path} was tokenized with tokenizer sha256 "
                              f"{c.meta.get('tokenizer_sha256')}, the training data {want.bin_path} with "
                              f"{want.meta.get('tokenizer_sha256')}: validation would score foreign tokens")


def find(resume: str | None, run_dir: str, discard_newer: bool = False) -> Path | None:
    """The checkpoint to resume from (see the module docstring), or None for a fresh start."""
    root = Path(run_dir) / ckpt.CKPT_DIR
    bad = ckpt.unreadable_checkpoints(root)
    if resume is None or resume == "none":
        found = [p.name for p in ckpt.complete_checkpoints(root)[-1:]] + [f"{p.name} (unreadable marker)" for p in bad]
        if found:
            raise ConfigError(f"train.run_dir={run_dir} already holds checkpoints ({', '.join(found)}); "
                              "pass --resume auto to continue it, or choose another train.run_dir")
        return None
    if resume == "auto":        # the newest complete one (``latest`` may lag it after a crash)
        done = ckpt.complete_checkpoints(root)
        point = done[-1] if done else None
    else:
        try:
            point = ckpt.resolve(resume)
        except FileNotFoundError as e:
            raise ConfigError(f"--resume {resume}: {e}") from None
    at = ckpt.step_of(point) if point is not None else -1
    for p in bad:
        if ckpt.step_of(p) > at:    # type: ignore[operator]
            _warn(f"{p / ckpt.MARKER} exists but cannot be read or parsed: resuming from "
                  f"{point.name if point else 'scratch'} instead; {p.name} is kept (inspect it, or move it away)")
    if point is not None and point.parent == root and resume != "auto":
        newer = [p for p in ckpt.complete_checkpoints(root) if ckpt.step_of(p) > at]  # type: ignore[operator]
        if newer and not discard_newer:
            raise ConfigError(f"--resume {resume}: {root} holds newer checkpoints ({', '.join(p.name for p in newer)})"
                              " that this run would overwrite; pass --discard-newer to move them aside "
                              "(renamed to STEP.superseded, not deleted)")
    return point


def set_aside_newer(point: Path) -> None:
    """``--discard-newer`` (after every check passed): rename the checkpoints newer than
    ``point`` to ``STEP.superseded`` (global rank 0; nothing is deleted)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for p in ckpt.complete_checkpoints(point.parent):
        if ckpt.step_of(p) > ckpt.step_of(point):  # type: ignore[operator]
            _warn(f"--discard-newer: {p.name} moved to {ckpt.move_aside(p, 'superseded').name}")


def _warn(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cratelm: warning: {msg}", flush=True)


def check_point(point: Path, cfg: JobConfig, data, layout: dict[str, Any]) -> ResumePoint:
    """Every check of a resume from ``point`` that needs no process group."""
    try:
        meta = ckpt.read_meta(point)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {e}") from None
    old, new = dict(meta.get("model", {})), dataclasses.asdict(cfg.model)
    diff = {k: (old.get(k), new.get(k)) for k in new if k not in IMPL_FIELDS and old.get(k) != new.get(k)}
    if diff:
        raise ConfigError(f"{point} holds a different model: " +
                          ", ".join(f"model.{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items()))
    if meta.get("tokenizer_sha256") != data.tokenizer_sha256:
        raise ConfigError(f"{point} was trained with tokenizer sha256 {meta.get('tokenizer_sha256')}; data.train "
                          f"is tokenized with {data.tokenizer_sha256}: resume with the checkpoint's data")
    state = meta.get("data", {})
    mine = (len(data.train), data.train.fingerprint())
    if (state.get("num_windows"), state.get("windows_fingerprint")) != mine:
        raise ConfigError(f"{point} was trained on other windows ({state.get('num_windows')} windows, fingerprint "
                          f"{state.get('windows_fingerprint')}); data.train gives {mine[0]} windows, fingerprint "
                          f"{mine[1]} (corpora, context, weights or data.seed changed)")
    try:
        ckpt.verify(point)
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from None
    saved = {k: meta.get(k) for k in layout}
    if not universal.needs_universal(saved, layout):
        return ResumePoint(point)
    try:
        universal.check_convertible(point, meta, layout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    change = universal.describe_change(saved, layout)
    _warn(f"resuming {point.name} on another layout ({change}) through a DeepSpeed universal checkpoint "
          f"({point / universal.UNIVERSAL}{'' if universal.is_converted(point) else ', converted now'})")
    return ResumePoint(point, change, True)


def configure(ds_config: dict[str, Any], point: ResumePoint) -> dict[str, Any]:
    """The DeepSpeed config, told to load a universal checkpoint when the layout changed."""
    if not point.universal:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
