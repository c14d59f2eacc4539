"""Multi-process training tests (gloo on CPU, OMP_NUM_THREADS=1): numerics of ZeRO 0-3 and the
pipeline against a single process, exact resume (checkpoint, SIGTERM, interrupted write),
export, the NaN policy, and the logs.

Each launch runs several jobs (tests/train/dist_driver.py) to save start-up time; the
fixtures are module-scoped and the tests read what the launches left behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import (REPO, base_env, free_port, job_config, losses, lrs, read_metrics, run_cmd,
                                  torchrun, write_yaml)

pytestmark = pytest.mark.distributed

DRIVER = str(REPO / "tests" / "train" / "dist_driver.py")
REL = 1e-5
STRAIGHT = 40        # steps of the uninterrupted ZeRO-2 run that the resumed runs are compared with


def close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def series(run_dir: Path, tag: str) -> dict[int, float]:
    return {r["step"]: r[tag] for r in read_metrics(run_dir) if tag in r}


def assert_matches(run: Path, ref: Path, steps: range, tags=("train/loss", "train/grad_norm")) -> None:
    for tag in tags:
        got, want = series(run, tag), series(ref, tag)
        for step in steps:
            assert close(got[step], want[step]), (run.name, tag, step, got[step], want[step])


def launch_driver(nproc: int, jobs: list[dict], tmp: Path, timeout: float = 400) -> None:
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    run_cmd(torchrun(nproc, DRIVER, str(spec)), timeout=timeout)


def exit_code(run_dir: Path) -> int:
    return int((run_dir / "driver_exit_code").read_text())


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# ----------------------------------------------------------------------------- launches

@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    """The reference: ONE plain process (no launcher), global batch 4 = micro 2 x accum 2,
    through the CLI, with --resume auto on an empty run directory (a fresh start)."""
    tmp = tmp_path_factory.mktemp("single")
    run_dir = tmp / "run"
    cfg = write_yaml(tmp / "cfg.yaml", job_config(corpus, run_dir, train={"max_steps": 10, "eval_interval": 5}))
    run_cmd([sys.executable, "-m", "cratelm", "train", "--config", str(cfg), "--resume", "auto"], timeout=200)
    return run_dir


@pytest.fixture(scope="module")
def zero(corpus, tmp_path_factory) -> dict[str, Path]:
    """2 ranks x micro 2 (global 4, the reference's samples): ZeRO 0-3, offload, activation
    checkpointing, 5 + resume 5, bf16, and the NaN policy, in one launch."""
    tmp = tmp_path_factory.mktemp("zero")
    z3_json = tmp / "z3.json"     # partition even the tiny tensors (DeepSpeed keeps < 1e5 whole)
    z3_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    two = {"micro_batch": 2, "global_batch": 4, "eval_interval": 5}
    runs = {name: tmp / name for name in ("z0", "z1", "z1_offload", "z2", "z3", "z3_ac", "z2_half",
                                          "bf16", "nan_skip", "nan_stop")}
    jobs = [
        {"config": job_config(corpus, runs["z0"], train={**two, "zero_stage": 0})},
        {"config": job_config(corpus, runs["z1"], train={**two, "zero_stage": 1})},
        {"config": job_config(corpus, runs["z1_offload"], train={**two, "zero_stage": 1, "offload_optimizer": True})},
        {"config": job_config(corpus, runs["z2"], train={**two, "zero_stage": 2, "max_steps": STRAIGHT})},
        {"config": job_config(corpus, runs["z3"], train={**two, "zero_stage": 3, "deepspeed_config": str(z3_json),
                                                         "diag_interval": 5, "eval_interval": 5, "peak_tflops": 1.0}),
         "dump_logits": str(tmp / "z3_logits.pt")},
        {"config": job_config(corpus, runs["z3_ac"], train={**two, "zero_stage": 3, "activation_checkpointing": True,
                                                            "deepspeed_config": str(z3_json)})},
        {"config": job_config(corpus, runs["z2_half"], train={**two, "zero_stage": 2, "max_steps": 5})},
        {"config": job_config(corpus, runs["z2_half"], train={**two, "zero_stage": 2, "max_steps": 10}),
         "resume": "auto"},
        {"config": job_config(corpus, runs["bf16"], optim={"lr": 1e-2, "decay_steps": 40},
                              train={**two, "zero_stage": 1, "precision": "bf16", "max_steps": 25})},
        {"config": job_config(corpus, runs["nan_skip"], train={**two, "zero_stage": 0, "nan_policy": "skip",
                                                               "max_steps": 6}),
         "env": {"CRATELM_FAULT_NAN_STEPS": "3"}},
        {"config": job_config(corpus, runs["nan_stop"], train={**two, "zero_stage": 2, "nan_policy": "stop",
                                                               "max_steps": 6, "ckpt_interval": 2}),
         "env": {"CRATELM_FAULT_NAN_STEPS": "5"}},
    ]
    launch_driver(2, jobs, tmp)
    runs["z3_logits"] = tmp / "z3_logits.pt"
    return runs


@pytest.fixture(scope="module")
def pipe(corpus, tmp_path_factory) -> dict[str, Path]:
    """2 stages on 2 ranks (data-parallel 1, accum 2: the reference's samples)."""
    tmp = tmp_path_factory.mktemp("pipe")
    p = {"pipeline_stages": 2, "zero_stage": 0, "micro_batch": 2, "global_batch": 4, "max_steps": 10}
    runs = {name: tmp / name for name in ("straight", "half", "ac", "uniform", "bf16")}
    jobs = [
        {"config": job_config(corpus, runs["straight"], train={**p, "diag_interval": 5, "eval_interval": 5,
                                                               "peak_tflops": 1.0}),
         "dump_logits": str(tmp / "logits.pt")},
        {"config": job_config(corpus, runs["half"], train={**p, "max_steps": 5})},
        {"config": job_config(corpus, runs["half"], train=p), "resume": "auto"},
        {"config": job_config(corpus, runs["ac"], train={**p, "max_steps": 5, "activation_checkpointing": True})},
        {"config": job_config(corpus, runs["uniform"], train={**p, "max_steps": 5, "zero_stage": 1,
                                                              "pipeline_partition": "uniform"})},
        {"config": job_config(corpus, runs["bf16"], model={"arch": "crate-lm"}, optim={"lr": 1e-2, "decay_steps": 40},
                              train={**p, "zero_stage": 1, "precision": "bf16", "max_steps": 25,
                                     "diag_interval": 25})},
    ]
    launch_driver(2, jobs, tmp)
    runs["logits"] = tmp / "logits.pt"
    return runs


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("name", ["z0", "z1", "z1_offload", "z2", "z3", "z3_ac"])
def test_zero_stages_match_single_process(single, zero, name):
    """Loss and gradient norm of every step, and the validation loss (reduced over ranks)."""
    assert exit_code(zero[name]) == 0
    assert_matches(zero[name], single, range(1, 6))
    assert close(series(zero[name], "val/loss")[5], series(single, "val/loss")[5])
    assert lrs(zero[name])[5] == lrs(single)[5]


@pytest.mark.parametrize("name", ["straight", "ac", "uniform"])
def test_pipeline_matches_single_process(single, pipe, name):
    assert exit_code(pipe[name]) == 0
    assert_matches(pipe[name], single, range(1, 6))
    assert close(series(pipe[name], "val/loss")[5], series(single, "val/loss")[5])


@pytest.mark.parametrize("fixture,name", [("zero", "bf16"), ("pipe", "bf16")])
def test_bf16_completes_and_learns(request, fixture, name):
    run = request.getfixturevalue(fixture)[name]
    got = losses(run)
    assert exit_code(run) == 0 and len(got) == 25
    assert all(math.isfinite(v) for v in got.values())
    first, last = sum(got[s] for s in (1, 2, 3)) / 3, sum(got[s] for s in (23, 24, 25)) / 3
    assert last < first - 0.2, (first, last)


# ----------------------------------------------------------------------------- resume

def test_zero2_resume_is_exact(zero):
    straight, resumed = zero["z2"], zero["z2_half"]
    assert losses(resumed) == {s: v for s, v in losses(straight).items() if s <= 10}
    assert lrs(resumed) == {s: v for s, v in lrs(straight).items() if s <= 10}


def test_pipeline_resume_is_exact(pipe):
    assert losses(pipe["half"]) == losses(pipe["straight"])
    assert lrs(pipe["half"]) == lrs(pipe["straight"])


def _wait_group(pgid: int, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process group {pgid} still alive after {timeout} s")


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_at_a_random_step_checkpoints_and_resumes_exactly(corpus, zero, tmp_path, launcher):
    """SIGTERM at a random step -> checkpoint, status 'preempted', exit 75 from the workers;
    then `torchrun ... cratelm train --resume auto` continues exactly. deepspeed: the signal
    goes to the launcher's whole process group (what SLURM and a terminal do: the `deepspeed`
    runner itself does not forward it on one node); torchrun: to the torchrun process only
    (it forwards SIGTERM to its workers)."""
    run_dir = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", job_config(corpus, run_dir, train={
        "micro_batch": 2, "global_batch": 4, "zero_stage": 2, "max_steps": 100000}))
    target = random.Random().randint(2, 8)
    port = free_port()
    if launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               "--module", "cratelm.train.trainer", "--config", str(cfg)]
    else:
        cmd = torchrun(2, "-m", "cratelm", "train", "--config", str(cfg))
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, env=base_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while True:
            assert proc.poll() is None, f"ended before the signal: {(tmp_path / 'log.txt').read_text()[-3000:]}"
            assert time.time() < deadline, "no progress"
            if metrics.exists() and any(r.get("step", 0) >= target for r in read_metrics(run_dir)):
                if launcher == "deepspeed":
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.005)
        proc.wait(timeout=120)
        _wait_group(proc.pid, timeout=120)      # the runner may exit before its workers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        # the deepspeed launcher sets LOCAL_SIZE, and DeepSpeed's CPU backend then maps a
        # 69 MB /dev/shm buffer per rank that it never unlinks: cratelm removes them at exit
        leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))
        for f in leaked:
            f.unlink(missing_ok=True)
    assert not leaked, f"shared-memory buffers left behind: {leaked}"
    st = status(run_dir)
    assert st["status"] == "preempted" and st["exit_code"] == 75, st
    stopped = st["step"]
    assert target <= stopped < STRAIGHT, (target, stopped)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    # resume under torchrun through the CLI
    end = min(stopped + 5, STRAIGHT)
    run_cmd(torchrun(2, "-m", "cratelm", "train", "--config", str(cfg), f"train.max_steps={end}", "--resume", "auto"))
    assert status(run_dir)["status"] == "finished"
    ref = losses(zero["z2"])
    assert losses(run_dir) == {s: ref[s] for s in range(1, end + 1)}, f"signal at step {target}, stopped {stopped}"
    ref_lr = lrs(zero["z2"])
    assert lrs(run_dir) == {s: ref_lr[s] for s in range(1, end + 1)}


def test_interrupted_checkpoint_write_keeps_latest_and_resumes(corpus, single, tmp_path):
    """Every rank dies after DeepSpeed wrote step 6's files, before the completion marker."""
    run_dir = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", job_config(corpus, run_dir, train={"max_steps": 10, "ckpt_interval": 3}))
    env = {**base_env(), "CRATELM_FAULT_CRASH_IN_CHECKPOINT": "6"}
    proc = run_cmd([sys.executable, "-m", "cratelm", "train", "--config", str(cfg)], env=env, check=False)
    assert proc.returncode == 86, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / "step_00000006" / "mp_rank_00_model_states.pt").exists()     # written ...
    assert not (ckpts / "step_00000006" / "cratelm.json").exists()              # ... but not complete
    from cratelm.train import checkpoint as ckpt

    assert ckpt.latest_checkpoint(ckpts) == ckpts / "step_00000003"
    run_cmd([sys.executable, "-m", "cratelm", "train", "--config", str(cfg), "--resume", "auto"])
    assert losses(run_dir) == losses(single)
    # the resumed run rewrote step 6, then kept the newest keep_last=2 complete ones
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000009", "step_00000010"]
    assert all(ckpt.is_complete(p) for p in ckpts.iterdir() if p.is_dir())


# ----------------------------------------------------------------------------- NaN policy

def test_nan_skip_drops_the_step_and_counts_it(single, zero):
    run = zero["nan_skip"]
    recs = {r["step"]: r for r in read_metrics(run) if "train/lr" in r}
    assert exit_code(run) == 0 and status(run)["status"] == "finished"
    assert recs[2]["train/skipped_steps"] == 0 and recs[3]["train/skipped_steps"] == 1
    assert "train/loss" not in recs[3]                       # the NaN step has no loss
    got, ref = losses(run), losses(single)
    assert got[1] == pytest.approx(ref[1], rel=REL) and got[2] == pytest.approx(ref[2], rel=REL)
    assert all(math.isfinite(got[s]) for s in (4, 5, 6))     # the weights were not poisoned
    assert got[4] != pytest.approx(ref[4], rel=REL)          # ... because the update was dropped


def test_nan_stop_keeps_the_last_good_checkpoint(zero):
    run = zero["nan_stop"]
    assert exit_code(run) == 3
    st = status(run)
    assert st["status"] == "nan" and st["step"] == 5
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (run / "checkpoints" / "step_00000005").exists()


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("fixture,run,logits", [("zero", "z3", "z3_logits"), ("pipe", "straight", "logits")])
def test_export_gives_the_engine_logits(request, fixture, run, logits, tmp_path):
    from cratelm.checkpoints import export, load_model

    runs = request.getfixturevalue(fixture)
    ref = torch.load(runs[logits], weights_only=True)
    out = export(runs[run], tmp_path / "exported")
    for path in (out, runs[run]):                 # the exported directory, and the run itself
        model, meta = load_model(path)
        with torch.no_grad():
            got = model(ref["idx"])
        torch.testing.assert_close(got, ref["logits"], rtol=1e-5, atol=1e-5)
        assert meta["tokenizer"] and Path(meta["tokenizer"]).read_bytes().startswith(b"not a real")
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["tokenizer"] == "tokenizer.model"


def test_export_cli(zero, tmp_path):
    proc = run_cmd([sys.executable, "-m", "cratelm", "export", str(zero["z2"]), str(tmp_path / "m")])
    assert "wrote" in proc.stdout and (tmp_path / "m" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- logs

def _documented_tags() -> list[tuple[str, str]]:
    """(tag, condition) rows of the TensorBoard table in docs/training.md."""
    rows = []
    text = (REPO / "docs" / "training.md").read_text()
    section = text.split("## TensorBoard tags", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and "/" in cells[0]:
            rows.append((cells[0].strip("`"), cells[2]))
    return rows


def _events(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("fixture,name", [("pipe", "straight"), ("zero", "z3")])
def test_tensorboard_has_every_documented_tag_and_matches_metrics_jsonl(request, fixture, name):
    run = request.getfixturevalue(fixture)[name]
    events = _events(run)
    rows = _documented_tags()
    assert len(rows) >= 15
    for tag, cond in rows:
        if "fp16" in cond or "CUDA" in cond:
            continue                      # loss scale, reserved GPU memory: not on a CPU run
        pattern = tag.replace("{i}", "00").replace("{L}", "01")
        assert pattern in events, f"documented tag {tag} missing from the event files of {name}"
    # metrics.jsonl holds exactly the scalars of the event files
    seen = set()
    for rec in read_metrics(run):
        for k, v in rec.items():
            if k in ("step", "time"):
                continue
            assert k in events and rec["step"] in events[k], (k, rec["step"])
            assert events[k][rec["step"]] == pytest.approx(float(v), rel=1e-6, abs=1e-12), (k, rec["step"])
            seen.add((k, rec["step"]))
    assert seen == {(k, s) for k, steps in events.items() for s in steps}


def test_console_line_and_status(single, zero):
    assert status(single)["status"] == "finished" and status(single)["exit_code"] == 0
    rec = read_metrics(single)[0]
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops", "mem/peak_gib"):
        assert key in rec, key
    assert (single / "tokenizer.model").exists() and (single / "config.yaml").exists()
    assert json.loads((single / "ds_config.json").read_text())["train_batch_size"] == 4


@pytest.mark.slow
def test_compile_and_activation_checkpointing_match_eager(corpus, single, tmp_path):
    """train.compile (torch.compile inside the engine) + activation checkpointing, one process."""
    run_dir = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", job_config(corpus, run_dir, train={
        "max_steps": 3, "compile": True, "activation_checkpointing": True}))
    proc = run_cmd([sys.executable, "-m", "cratelm", "train", "--config", str(cfg)], timeout=400)
    assert "torch.compile, activation checkpointing" in proc.stdout
    got, ref = losses(run_dir), losses(single)
    for step in (1, 2, 3):
        assert close(got[step], ref[step], rel=1e-5), (step, got[step], ref[step])
