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

Order of a save (every rank calls `save`): rank 0 removes a stale directory of the same
tag; barrier; DeepSpeed writes its files; each rank writes its rank file; barrier (all
ranks finished writing); rank 0 writes ``cratelm.json`` (temporary name, fsync, rename),
then ``latest`` the same way, then deletes all but the newest ``keep_last`` complete
checkpoints and any incomplete directory. A crash at any point leaves ``latest`` naming
the previous complete checkpoint; a directory without ``cratelm.json`` is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
MARKER = "cratelm.json"
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


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint directory whose marker exists and parses."""
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """cratelm.json of a complete checkpoint."""
    p = Path(path) / MARKER
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete cratelm checkpoint ({MARKER} missing or unreadable)")
    return json.loads(p.read_text())


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``root`` (RUN_DIR/checkpoints), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))  # type: ignore[arg-type, return-value]


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
    for root in (p / CKPT_DIR, p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if p.is_dir() and step_of(p) is not None:
        raise FileNotFoundError(f"{p} is an incomplete checkpoint (no {MARKER}: its write was interrupted)")
    raise FileNotFoundError(f"{p}: no complete cratelm checkpoint (looked for {p / CKPT_DIR / LATEST}, "
                            f"{p / LATEST} and {p / MARKER})")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def prune(root: Path, keep_last: int, current: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and every incomplete one
    (call only when no save is in flight). ``current``, the checkpoint just written, is always
    kept; checkpoints past it belong to a run that was rewound (``--resume`` an older one) and
    are superseded, as the rewound run will write those steps again. Returns what was deleted."""
    done = complete_checkpoints(root)
    if current is not None:
        done = [p for p in done if step_of(p) <= step_of(current)]
    keep = set(done[-keep_last:]) | ({Path(current)} if current is not None else set())
    gone = []
    for p in root.iterdir():
        if p.is_dir() and step_of(p) is not None and p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


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
        if path.exists():                     # an interrupted attempt at this very step
            shutil.rmtree(path)
    barrier()
    engine.ds.save_checkpoint(str(root), tag=tag, client_state={"cratelm": meta}, save_latest=False)
    path.mkdir(parents=True, exist_ok=True)
    _torch_save_atomic(rank_state, path / f"rank_{rank:05d}.pt")
    if os.environ.get(FAULT_ENV) == str(step):
        os._exit(86)
    barrier()
    if rank == 0:
        _write_atomic(path / MARKER, (json.dumps({**meta, "format": FORMAT, "version": 1, "tag": tag,
                                                  "complete": True}, indent=2) + "\n").encode())
        _write_atomic(root / LATEST, tag.encode())
        prune(root, keep_last, path)
    barrier()
    return path


def load(engine, path: str | os.PathLike, layout: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load checkpoint ``path`` into ``engine`` (every rank calls this). ``layout`` is the
    current job's world_size / pipeline_stages / zero_stage: DeepSpeed can only resume the
    layout it saved (except ZeRO-0 without pipeline, which resumes on any world size).
    Returns (cratelm.json, this rank's rank file or None)."""
    import torch.distributed as dist

    path = Path(path)
    meta = read_meta(path)
    saved = {k: meta.get(k) for k in layout}
    flexible = layout.get("zero_stage") == 0 and layout.get("pipeline_stages") == 1 and \
        saved.get("zero_stage") == 0 and saved.get("pipeline_stages") == 1
    if saved != layout and not flexible:
        raise RuntimeError(f"{path} was written with {saved}; this job has {layout}. DeepSpeed resumes only the "
                           "layout it saved: relaunch with the same world size / stages / ZeRO stage "
                           "(or convert the checkpoint with DeepSpeed's universal-checkpoint tools)")
    load_path, _ = engine.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True) \
        if rank_file.is_file() and saved == layout else None
    return meta, rank_state
