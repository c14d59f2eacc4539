"""No checkpoint silently lost, durable saves, and bad resumes refused before any process
group (one line, exit 2). One 3-step single-process run (a checkpoint per step, every
fsync and rename recorded) is copied and damaged in each test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cratelm.config import ConfigError, config_from_dict
from cratelm.train import checkpoint as ckpt
from .conftest import REPO, base_env, free_port, job_config, read_metrics, run_cmd, write_corpus, write_yaml

FSYNC_DRIVER = str(REPO / "tests" / "train" / "fsync_driver.py")
STEPS = ["step_00000001", "step_00000002", "step_00000003"]


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume_checks")
    run = tmp / "run"
    cfg = job_config(corpus, run, train={"max_steps": 3, "ckpt_interval": 1, "keep_last": 5})
    run_cmd([sys.executable, FSYNC_DRIVER, str(write_yaml(tmp / "cfg.yaml", cfg)), str(tmp / "log.json")])
    return {"run": run, "cfg": cfg, "log": json.loads((tmp / "log.json").read_text())}


def _copy(base: dict, tmp_path: Path, **train) -> tuple[Path, dict]:
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    cfg = json.loads(json.dumps(base["cfg"]))
    cfg["train"].update(run_dir=str(run), **train)
    return run, cfg


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def _cli(cfg: dict, tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratelm", "train", "--config",
                           str(write_yaml(tmp_path / "cfg.yaml", cfg)), *args],
                          env=env or base_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]


def test_save_fsyncs_every_file_before_marking_complete(base):
    log, tag = base["log"], base["run"] / "checkpoints" / "step_00000003"
    marker = next(i for i, e in enumerate(log) if e[0] == "replace" and e[2] == str(tag / ckpt.MARKER))
    latest = next(i for i, e in enumerate(log) if i > marker and e[0] == "replace"
                  and e[2] == str(tag.parent / ckpt.LATEST))
    before = {e[1] for e in log[:marker] if e[0] == "fsync"}
    files = {str(f) for f in tag.rglob("*") if f.is_file() and f.name != ckpt.MARKER}
    assert files and files <= before, files - before               # DeepSpeed's files and cratelm's
    assert str(tag) in before                                       # the directory's entries
    after = [e[1] for e in log[marker + 1:latest + 2] if e[0] == "fsync"]
    assert after.count(str(tag)) >= 1 and str(tag.parent) in after    # dirs after the renames
    meta = ckpt.read_meta(tag)
    assert set(meta["files"]) == {str(Path(f).relative_to(tag)) for f in files}


def test_unreadable_marker_is_skipped_with_a_warning_and_kept(base, tmp_path):
    """... and the resumed run doubles the global batch: allowed, with a note, and `tokens`
    counts what was consumed (2 steps x 4 samples, then 2 x 8; context 16)."""
    run, cfg = _copy(base, tmp_path, max_steps=4, global_batch=8)
    bad = run / "checkpoints" / "step_00000003" / ckpt.MARKER
    bad.write_text('{"complete": tr')
    (run / "checkpoints" / ".latest.tmp-999999").write_text("step_0000")
    fresh = _cli(cfg, tmp_path)                                      # a fresh start into it: refused
    assert fresh.returncode == 2 and "step_00000003" in fresh.stderr
    proc = _cli(cfg, tmp_path, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{bad} exists but cannot be read" in proc.stdout and "resuming from step_00000002" in proc.stdout
    kept = run / "checkpoints" / "step_00000003.replaced" / ckpt.MARKER
    assert kept.read_text() == '{"complete": tr'                   # moved aside when step 3 was rewritten
    assert not (run / "checkpoints" / ".latest.tmp-999999").exists()
    assert _steps(run) == STEPS + ["step_00000003.replaced", "step_00000004"]
    assert "trained with global batch 4; continuing with 8" in proc.stdout
    tokens = {r["step"]: r["train/tokens"] for r in read_metrics(run) if "train/tokens" in r}
    assert tokens == {1: 64, 2: 128, 3: 256, 4: 384}
    assert ckpt.read_meta(run / "checkpoints" / "step_00000004")["tokens"] == 384


def test_bad_resumes_are_refused_before_any_process_group(base, corpus, tmp_path):
    from cratelm.train.trainer import prepare

    run, cfg = _copy(base, tmp_path)
    target = run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt"
    os.truncate(target, target.stat().st_size // 2)
    with pytest.raises(ConfigError, match=f"{target} has .* bytes.*truncated"):
        prepare(config_from_dict(cfg), "auto")
    # another corpus, another tokenizer, a foreign validation shard, an unwritable run_dir
    other = write_corpus(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="trained on other windows"):
        prepare(config_from_dict({**cfg, "data": {**cfg["data"], "train": [str(other)], "val": str(other)}}),
                str(run / "checkpoints" / "step_00000002"), discard_newer=True)
    retok = tmp_path / "retok"
    shutil.copytree(corpus, retok)
    (retok / "tokenizer.model").write_bytes(b"another tokenizer\n")
    meta = json.loads((retok / "meta.json").read_text())
    (retok / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "f" * 64}))
    with pytest.raises(ConfigError, match="tokenizer sha256"):
        prepare(config_from_dict({**cfg, "data": {**cfg["data"], "train": [str(retok)], "val": str(retok)}}),
                str(run / "checkpoints" / "step_00000002"), discard_newer=True)
    fresh = job_config(corpus, tmp_path / "fresh")
    with pytest.raises(ConfigError, match=f"data.val: {retok / 'val.bin'} was tokenized"):
        prepare(config_from_dict({**fresh, "data": {**fresh["data"], "val": str(retok)}}))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a writable directory"):
        prepare(config_from_dict(job_config(corpus, tmp_path / "file" / "run")))
    assert _steps(run) == STEPS                                      # nothing deleted, nothing moved
    # the command line: one line, exit 2, no traceback; also on 2 ranks (no process group: no hang)
    proc = _cli(cfg, tmp_path, "--resume", "auto")
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1 and str(target) in proc.stderr, proc.stderr
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "cratelm", "train", "--config", str(tmp_path / "cfg.yaml"),
                               "--resume", "auto"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**base_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and len(_lines(err)) == 1 and str(target) in err, err
        assert "Traceback" not in out + err and "gloo" not in (out + err).lower()
    assert _steps(run) == STEPS


def test_resume_of_an_older_step_keeps_the_newer_ones(base, tmp_path):
    from cratelm.train.trainer import prepare

    run, cfg = _copy(base, tmp_path)
    old = str(run / "checkpoints" / "step_00000001")
    with pytest.raises(ConfigError, match="holds newer checkpoints .*step_00000002, step_00000003.*--discard-newer"):
        prepare(config_from_dict(cfg), old)
    assert _steps(run) == STEPS
    *_, point = prepare(config_from_dict(cfg), old, discard_newer=True)
    assert point == Path(old)
    assert _steps(run) == ["step_00000001", "step_00000002.superseded", "step_00000003.superseded"]
