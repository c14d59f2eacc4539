"""Checkpoints: DeepSpeed's files plus cratelm's state, complete-or-invisible.

Layout::

    RUN_DIR/checkpoints/
        step_00001000/                  one checkpoint (the DeepSpeed "tag")
            mp_rank_00_model_states.pt  DeepSpeed: module (ZeRO 0-2) + client state
            *_optim_states.pt           DeepSpeed: optimizer partitions (ZeRO >= 1)
            layer_XX-model_*states.pt   DeepSpeed pipeline: one file per layer
            rank_00000.pt               cratelm, one per rank: RNG states, sampler state
            cratelm.json                cratelm, written LAST: the completion marker (step,
                                        consumed samples, layout, resolved config, ...)
        latest                          the tag of the newest complete checkpoint
        zero_to_fp32.py                 DeepSpeed's recovery script (ZeRO >= 1)

            universal/                  a DeepSpeed universal checkpoint of this step, made
                                        when a job with another layout resumes from it
                                        (cratelm.train.universal)
        step_00001000.replaced          a checkpoint moved aside, never deleted (see below)
        latest                          the tag of the newest complete checkpoint
        zero_to_fp32.py                 DeepSpeed's recovery script (ZeRO >= 1)

Order of a save (every rank calls `save`): rank 0 removes an interrupted attempt at the
same tag (a directory without ``cratelm.json``; one with a marker is moved aside) and stale
``.latest.tmp-*`` files; barrier; DeepSpeed writes its files; each rank writes its rank
file (temporary name, fsync, rename); barrier; every rank fsyncs every file and directory
of the checkpoint (on a shared file system each flushes its own writes); barrier; rank 0
writes ``cratelm.json`` (with a manifest: every file's size) and then ``latest``, each by
temporary name + fsync + rename + fsync of the directory, then prunes. A crash at any point
leaves ``latest`` naming the previous complete checkpoint; a directory without
``cratelm.json`` is never loaded.

Nothing is deleted that is not positively known to be superseded: pruning removes only
complete checkpoints older than the one just written (beyond ``keep_last``) and interrupted
writes older than it; a checkpoint whose marker exists but cannot be read or parsed is
never treated as incomplete (resume falls back past it with a warning, and it is kept).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cratelm.train import universal
from cratelm.train.durable import fsync_dir, fsync_tree, write_atomic

CKPT_DIR = "checkpoints"
MARKER = "cratelm.json"
UNIVERSAL_DIR = "universal"
LATEST = "latest"
FORMAT = "cratelm-checkpoint"
FAULT_ENV = "CRATELM_FAULT_CRASH_IN_CHECKPOINT"
"""Test hook: when set to a step, every rank exits (code 86) right after DeepSpeed wrote that
step's files and before the checkpoint is marked complete (a simulated crash mid-write)."""

_TAG = re.compile(r"step_(\d+)")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | os.PathLike) -> int | None:
    m = _TAG.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (names the file); the CLI exits 2."""


def marker_state(path: str | os.PathLike) -> str:
    """``complete`` (the marker parses and says so), ``incomplete`` (no marker: a write that
    was interrupted) or ``unreadable`` (a marker that exists but cannot be read or parsed, or
    does not say complete: never treated as incomplete, never deleted)."""
    try:
        body = json.loads((Path(path) / MARKER).read_text())
    except FileNotFoundError:
        return "incomplete"
    except (OSError, ValueError):
        return "unreadable"
    return "complete" if isinstance(body, dict) and body.get("complete") is True else "unreadable"


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint directory whose marker exists and parses."""
    return marker_state(path) == "complete"


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """cratelm.json of a complete checkpoint."""
    state = marker_state(path)
    if state != "complete":
        why = "missing" if state == "incomplete" else "unreadable"
        raise FileNotFoundError(f"{path} is not a complete cratelm checkpoint ({MARKER} {why})")
    return json.loads((Path(path) / MARKER).read_text())


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Every ``step_*`` directory under ``root``, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
                  key=lambda p: step_of(p))  # type: ignore[arg-type, return-value]


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root`` (RUN_DIR/checkpoints), oldest first."""
    return [p for p in checkpoint_dirs(root) if is_complete(p)]


def unreadable_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoints whose marker exists but cannot be read (see marker_state)."""
    return [p for p in checkpoint_dirs(root) if marker_state(p) == "unreadable"]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one, else None."""
    root = Path(root)
    try:
        tag = (root / LATEST).read_text().strip()
        if tag and is_complete(root / tag):
            return root / tag
    except OSError:
        pass
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory from a run directory, its ``checkpoints`` directory,
    or a checkpoint directory itself. Raises FileNotFoundError naming what was looked at."""
    p = Path(path)
    if is_complete(p):
        return p
    if marker_state(p) == "unreadable":
        raise FileNotFoundError(f"{p / MARKER} exists but cannot be read or parsed")
    for root in (p / CKPT_DIR, p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if p.is_dir() and step_of(p) is not None:
        raise FileNotFoundError(f"{p} is an incomplete checkpoint (no {MARKER}: its write was interrupted)")
    raise FileNotFoundError(f"{p}: no complete cratelm checkpoint (looked for {p / CKPT_DIR / LATEST}, "
                            f"{p / LATEST} and {p / MARKER})")


def _torch_save_atomic(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def remove_stale_temporaries(root: Path) -> None:
    """``.latest.tmp-PID`` files of writers that died between write and rename."""
    for p in root.glob(f".{LATEST}.tmp-*"):
        with contextlib.suppress(OSError):
            p.unlink()


def manifest(path: Path) -> dict[str, int]:
    """name -> size of every file of the checkpoint (the marker excluded)."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and not f.is_symlink() and f.name != MARKER and not f.name.startswith(".")
            and UNIVERSAL_DIR not in f.relative_to(path).parts}


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def move_aside(path: Path, why: str) -> Path:
    """Rename checkpoint ``path`` to ``path.WHY[.N]``: out of every listing, nothing deleted."""
    n, dst = 0, path.with_name(f"{path.name}.{why}")
    while dst.exists():
        n += 1
        dst = path.with_name(f"{path.name}.{why}.{n}")
    os.replace(path, dst)
    fsync_dir(path.parent)
    return dst


def prune(root: Path, keep_last: int, current: Path) -> list[Path]:
    """After ``current`` was written: delete the complete checkpoints older than it beyond the
    newest ``keep_last`` (``current`` counted), and interrupted writes (no marker) older than
    it. Never deletes a newer checkpoint, nor one whose marker cannot be read. Returns what
    was deleted."""
    now = step_of(current)
    older = [p for p in checkpoint_dirs(root) if step_of(p) < now]   # type: ignore[operator]
    done = [p for p in older if is_complete(p)]
    doomed = done[:max(0, len(done) - (keep_last - 1))] + [p for p in older if marker_state(p) == "incomplete"]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return sorted(doomed)


def save(engine, run_dir: str | os.PathLike, step: int, meta: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int) -> Path:
    """Write checkpoint ``step`` (every rank calls this; see the module docstring)."""
    import torch.distributed as dist

    from cratelm.dist import barrier

    rank = dist.get_rank()
    root = Path(run_dir) / CKPT_DIR
    tag = tag_of(step)
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        if path.exists():
            if marker_state(path) == "incomplete":     # an interrupted attempt at this very step
                shutil.rmtree(path)
            else:                                      # never delete a checkpoint: keep it aside
                print(f"cratelm: warning: {path} exists ({marker_state(path)}); moved to "
                      f"{move_aside(path, 'replaced')}", flush=True)
    barrier()
    engine.ds.save_checkpoint(str(root), tag=tag, client_state={"cratelm": meta, **universal.client_state()},
                              save_latest=False)
    path.mkdir(parents=True, exist_ok=True)
    _torch_save_atomic(rank_state, path / f"rank_{rank:05d}.pt")
    if os.environ.get(FAULT_ENV) == str(step):
        os._exit(86)
    barrier()                    # every rank has written; each flushes what it sees
    fsync_tree(path)
    barrier()
    if rank == 0:
        body = {**meta, "format": FORMAT, "version": 1, "tag": tag, "files": manifest(path),
                "universal_checkpoint_info": True, "complete": True}
        write_atomic(path / MARKER, (json.dumps(body, indent=2) + "\n").encode())
        write_atomic(root / LATEST, tag.encode())
        prune(root, keep_last, path)
    barrier()
    return path


def verify(path: Path) -> None:
    """Check the files of checkpoint ``path`` against its manifest (sizes) and that every
    ``.pt`` file is a whole torch zip archive. Cheap: no tensor is read. Raises CheckpointError
    naming the first bad file."""
    meta = read_meta(path)
    for name, size in (meta.get("files") or {}).items():
        f = path / name
        try:
            have = f.stat().st_size
        except OSError as e:
            raise CheckpointError(f"{f}: missing or unreadable ({e.strerror}); the checkpoint is damaged") from None
        if have != size:
            raise CheckpointError(f"{f} has {have} bytes, {size} when it was written: the file is truncated or "
                                  "damaged")
    for f in sorted(path.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                z.infolist()
        except (OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{f} is not a readable torch file ({e}): truncated or damaged") from None


def load(engine, path: str | os.PathLike, layout: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load checkpoint ``path`` into ``engine`` (every rank calls this). ``layout`` is the
    current job's world_size / pipeline_stages / zero_stage. The saved layout loads directly
    (and ZeRO-0 without a pipeline on any world size); another one through a DeepSpeed
    universal checkpoint (cratelm.train.universal; the engine was built for it).
    Returns (cratelm.json, this rank's rank file, or None when the layout changed)."""
    import torch.distributed as dist

    path = Path(path)
    meta = read_meta(path)
    saved = {k: meta.get(k) for k in layout}
    if universal.needs_universal(saved, layout):
        universal.load(engine, path, meta)
    else:
        load_path, _ = engine.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True) \
        if rank_file.is_file() and saved == layout else None
    return meta, rank_state
