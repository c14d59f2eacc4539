"""launch/deepspeed_multinode.sh with the real tools (tests/launch/ssh_local.sh): two loopback
"nodes" node0 = 127.0.0.1 and node1 = 127.0.0.2 behind a loopback-only sshd, pdsh, OpenMPI.

- pdsh/ssh, one rank per node: SIGTERM to the script on the head -> every rank checkpoints ->
  exit 75; `--resume auto` through the same script continues; a SIGKILL of the script then
  leaves nothing running (its watchdog stops the ranks, which checkpoint); the losses of the
  whole run equal one process's;
- OpenMPI (mpirun over ssh, MASTER_ADDR/MASTER_PORT passed with -x) equals one process;
- one process whose console goes away (stdout closed by its reader) trains to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cratelm.train import checkpoint as ckpt

from .conftest import LAUNCH, REPO, free_port, pids_mentioning, read_metrics, subprocess_env, train_overrides
from .test_slurm_real import last_step, status, wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TINY = str(REPO / "configs/model/tiny.yaml")
TIMEOUT = 300


@pytest.fixture
def leave_nothing(tmp_path):
    """After the test, even a failed one: SIGKILL what still runs in tmp_path (the runner and
    the watchdog live in sessions of their own); a passing test has left nothing."""
    yield
    for pid in pids_mentioning(str(tmp_path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(tmp_path: Path, ds_args: list[str], over: list[str], *extra: str) -> subprocess.Popen:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    # the remote ranks get only PYTHON* and .deepspeed_env from here (this directory exists on both "nodes")
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\n")
    return subprocess.Popen([str(LAUNCH / "deepspeed_multinode.sh"), str(hostfile), "--master_addr", "node0",
                             "--master_port", str(free_port()), *ds_args, "--", "--config", TINY, *over, *extra],
                            env=subprocess_env(PYTHON=sys.executable), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    try:
        return p.communicate(timeout=timeout)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_pdsh_sigterm_resume_sigkill_and_openmpi_equal_one_process(real_ssh, corpus, tmp_path, leave_nothing):
    run_dir = tmp_path / "run"
    # many steps: the signals, not max_steps, end each run; decay_steps pins the LR schedule
    over = train_overrides(corpus, run_dir, **{"train.max_steps": 5000, "optim.decay_steps": 40})

    # 1. SIGTERM to the script on the head: every rank checkpoints, exit 75
    p = launch(tmp_path, [], over, "--resume", "auto")
    wait_for("step 2", lambda: last_step(run_dir) >= 2 or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    out = finish(p)
    assert p.returncode == 75, out[-4000:]
    assert "got SIGTERM" in out and "BrokenPipeError" not in out, out[-4000:]
    st = status(run_dir)
    assert (st["status"], st["exit_code"]) == ("preempted", 75), st
    k = st["step"]
    latest = ckpt.latest_checkpoint(run_dir / ckpt.CKPT_DIR)
    assert latest.name == ckpt.tag_of(k) and ckpt.is_complete(latest)
    assert sorted(f.name for f in latest.glob("*model_states.pt")) == ["mp_rank_00_model_states.pt"]
    assert len(list(latest.glob("*optim_states.pt"))) == 2                     # both ranks wrote theirs
    wait_for("no process left", lambda: not pids_mentioning(str(run_dir)), timeout=30)

    # 2. --resume auto through the same script; then SIGKILL of the script: the watchdog stops the ranks
    p = launch(tmp_path, [], over, "--resume", "auto")
    wait_for(f"step {k + 2}", lambda: last_step(run_dir) >= k + 2 or p.poll() is not None)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    wait_for("the ranks to stop after the SIGKILL", lambda: not pids_mentioning(str(run_dir)), timeout=TIMEOUT)
    out = finish(p, 60)                                      # the runner and the watchdog held stdout
    assert "the launch script is gone: stopping the ranks" in out, out[-3000:]
    st = status(run_dir)
    assert st["status"] == "preempted" and st["step"] >= k + 2, (st, out[-3000:])
    m = st["step"]
    recs = read_metrics(run_dir)
    assert [r["step"] for r in recs] == list(range(1, m + 1))

    # 3. OpenMPI: mpirun over ssh; MASTER_ADDR/MASTER_PORT go to the ranks with -x
    mpi_dir = tmp_path / "mpi"
    p = launch(tmp_path, ["--launcher", "openmpi",
                          "--launcher_args=--allow-run-as-root --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"],
               train_overrides(corpus, mpi_dir, **{"train.max_steps": 4, "optim.decay_steps": 40}))
    out = finish(p)
    assert p.returncode == 0, out[-4000:]
    assert "-x MASTER_ADDR=node0 -x MASTER_PORT=" in out and "2 ranks, dp 2" in out, out[-4000:]

    # 4. one process, whose stdout reader goes away after the first line: it trains to the end
    ref_dir = tmp_path / "ref"
    err = tmp_path / "ref.err"
    with err.open("w") as ef:
        ref = subprocess.Popen([sys.executable, "-u", "-m", "cratelm", "train", "--config", TINY,
                                *train_overrides(corpus, ref_dir, **{"train.max_steps": m, "optim.decay_steps": 40})],
                               env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=ef)
        ref.stdout.readline()
        ref.stdout.close()                                   # the console is gone
        assert ref.wait(timeout=TIMEOUT) == 0, err.read_text()[-3000:]
    assert status(ref_dir)["status"] == "finished"
    want = [r["train/loss"] for r in read_metrics(ref_dir)]
    assert len(set(want)) == m
    for name, got in (("pdsh", [r["train/loss"] for r in recs]),
                      ("openmpi", [r["train/loss"] for r in read_metrics(mpi_dir)])):
        assert all(abs(g - w) <= 1e-6 * abs(w) for g, w in zip(got, want)) and got, (name, got, want)
