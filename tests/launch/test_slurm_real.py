"""launch/slurm.sbatch under a real SLURM 22.05 (tests/launch/slurm_local.sh: slurmctld,
slurmd and munge on this host, proctrack/linuxproc), and cratelm.launch_guard.

One job: it trains; the time-limit warning (SIGUSR1 to the batch shell, as
``--signal=B:USR1@120`` sends it; here by ``scancel --signal=USR1 --batch``) makes the ranks
checkpoint and the script requeue the job (same id); the requeued job resumes at the next
step; a plain ``scancel`` then stops it with a checkpoint and no requeue. Its losses equal
an uninterrupted single process's, and nothing it started is left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cratelm.launch_guard import _children
from cratelm.train import checkpoint as ckpt

from .conftest import LAUNCH, REPO, free_port, pids_mentioning, read_metrics, subprocess_env, train_overrides

pytestmark = pytest.mark.distributed
TINY = str(REPO / "configs/model/tiny.yaml")
TIMEOUT = 300


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(what: str, cond, timeout: float = TIMEOUT, every: float = 0.2):
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def last_step(run_dir: Path) -> int:
    try:
        return read_metrics(run_dir)[-1]["step"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError, KeyError):
        return 0


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
def test_warning_checkpoints_requeues_resumes_exactly_and_scancel_does_not_requeue(real_slurm, corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # many steps: the signals, not max_steps, end each run; decay_steps pins the LR schedule
    over = train_overrides(corpus, run_dir, **{"train.max_steps": 5000, "optim.decay_steps": 40})
    env = subprocess_env(PYTHON=sys.executable, GPUS_PER_NODE="1")
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                        f"--output={log}", str(LAUNCH / "slurm.sbatch"), "--config", TINY, *over],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    try:
        # 1. it trains; the time-limit warning -> checkpoint -> requeue (same job id)
        wait_for("step 2", lambda: last_step(run_dir) >= 2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        wait_for("the requeue", lambda: job(job_id).get("Restarts") == "1" and job(job_id)["JobState"] == "PENDING")
        st = status(run_dir)
        assert (st.get("status"), st.get("exit_code")) == ("preempted", 75), (st, log.read_text()[-3000:])
        k = st["step"]
        latest = ckpt.latest_checkpoint(run_dir / ckpt.CKPT_DIR)
        assert latest.name == ckpt.tag_of(k) and ckpt.is_complete(latest)
        assert not pids_mentioning(str(run_dir)), "a rank outlived the first run"
        # 2. requeued jobs are held (BeginTime) by slurmctld for a while: start it now
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
        wait_for("the resumed steps", lambda: job(job_id)["JobState"] == "RUNNING" and last_step(run_dir) >= k + 2)
        # 3. a plain scancel: the ranks checkpoint, the job is cancelled, not requeued
        before_cancel = log.read_text()
        subprocess.run(["scancel", job_id], check=True)
        wait_for("the cancel", lambda: job(job_id)["JobState"] in ("CANCELLED", "COMPLETED", "FAILED"))
        time.sleep(2)
        info = job(job_id)
        assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "1"), info
    finally:
        subprocess.run(["scancel", "--full", "--signal=KILL", job_id], capture_output=True)
    out = log.read_text()
    assert "got SIGUSR1" in out and f"requeueing job {job_id}" in out, out[-3000:]
    assert f"job {job_id} (restart 1)" in out and f"resuming from {latest} at step {k}" in out, out[-3000:]
    # the warning reached the ranks through the step, never through srun (which would SIGKILL them);
    # a plain scancel signals srun too ("forcing job termination"), yet the ranks checkpoint within KillWait
    assert "forcing job termination" not in before_cancel and "cancelled: no requeue" in out, out[-3000:]
    st = status(run_dir)
    assert st["status"] == "preempted" and st["step"] > k + 1, st
    wait_for("every process of the job to end", lambda: not pids_mentioning(str(run_dir)), timeout=30)

    recs = read_metrics(run_dir)
    n = len(recs)
    assert [r["step"] for r in recs] == list(range(1, n + 1)) and n == st["step"]
    ref_dir = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "cratelm", "train", "--config", TINY,
                        *train_overrides(corpus, ref_dir, **{"train.max_steps": n, "optim.decay_steps": 40})],
                       env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = [r["train/loss"] for r in read_metrics(ref_dir)]
    got = [r["train/loss"] for r in recs]
    assert len(set(ref)) == n and all(abs(g - w) <= 1e-6 * abs(w) for g, w in zip(got, ref)), (got, ref, k)


WORKER = """
import os, sys, time
open(os.path.join(sys.argv[1], f"worker{os.environ['LOCAL_RANK']}"), "w").write(str(os.getpid()))
time.sleep(300)
"""


def test_guard_takes_torchrun_workers_down_when_torchrun_is_killed(tmp_path):
    """SIGKILL of torchrun alone leaves its workers running (own sessions); under
    cratelm.launch_guard they are stopped when torchrun ends."""
    (tmp_path / "w.py").write_text(WORKER)
    p = subprocess.Popen([sys.executable, "-m", "cratelm.launch_guard", "--grace", "2", "--",
                          sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(tmp_path / "w.py"), str(tmp_path)],
                         env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        files = wait_for("both workers", lambda: len(list(tmp_path.glob("worker*"))) == 2 and
                         list(tmp_path.glob("worker*")), timeout=120)
        workers = [int(f.read_text()) for f in files]
        (torchrun,) = _children(p.pid)
        assert all(Path(f"/proc/{w}").exists() for w in workers)
        os.kill(torchrun, signal.SIGKILL)
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 137, err
    assert "stopped 2 process(es) left behind" in err, err
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and
                "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
