"""The launch/ scripts, run with stand-ins for python/torchrun/srun/scontrol that log what
they were asked to start (no training here; see test_multinode.py for real runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import LAUNCH, REPO, free_port, slurm_env, subprocess_env, write_exe

SCRIPTS = ["single_node.sh", "deepspeed_multinode.sh", "torchrun_multinode.sh", "slurm.sbatch"]
TINY = str(REPO / "configs/model/tiny.yaml")

# Logs argv, a few variables and the SLURM task ids as one JSON line to $FAKE_LOG; with
# FAKE_SLEEP it then waits for SIGTERM (logging it) as a training job would.
FAKE_LOGGER = f"""#!{sys.executable}
import json, os, signal, sys, time
name = os.path.basename(sys.argv[0])
keys = ("SLURM_NODEID", "SLURM_PROCID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
        "MASTER_PORT", "OMP_NUM_THREADS", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
def log(**kw):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(dict(tool=name, **kw)) + "\\n")
def term(sig, frame):
    log(signal=signal.Signals(sig).name)
    if os.environ.get("FAKE_STATUS"):      # what rank 0 writes after its checkpoint
        with open(os.path.join(os.environ["FAKE_RUN_DIR"], "status.json"), "w") as f:
            json.dump({{"status": os.environ["FAKE_STATUS"]}}, f)
    sys.exit(int(os.environ.get("FAKE_EXIT_ON_TERM", "0")))
signal.signal(signal.SIGTERM, term)      # before the log line the test waits for
log(argv=sys.argv[1:], env={{k: os.environ.get(k) for k in keys}})
if os.environ.get("FAKE_SLEEP"):
    deadline = time.time() + float(os.environ["FAKE_SLEEP"])
    while time.time() < deadline:
        time.sleep(0.05)
"""

# A `python` that logs the launcher invocations (`-m deepspeed.launcher.runner`,
# `-m torch.distributed.run`, `-m cratelm train`, GPU count queries) and runs anything else
# (e.g. `-m cratelm launch-check`) with the real interpreter.
FAKE_PYTHON = f"""#!/bin/bash
case "$*" in
    "-c import torch; print(torch.cuda.device_count())") echo 0; exit 0;;
    "-c import torch; print(torch.cuda.device_count() or 1)") echo 1; exit 0;;
    "-m deepspeed.launcher.runner "*|"-m torch.distributed.run "*|"-u -m cratelm train"*)
        exec "$(dirname "$0")/fake_logger_python" "$@";;
esac
exec {sys.executable} "$@"
"""


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture
def fakes(tmp_path, slurm_shims):
    bin_dir, log = slurm_shims
    write_exe(bin_dir / "torchrun", FAKE_LOGGER)
    write_exe(bin_dir / "fake_logger_python", FAKE_LOGGER)
    python = write_exe(bin_dir / "python", FAKE_PYTHON)
    return bin_dir, log, python


def run(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_and_start_with_their_usage(name):
    path = LAUNCH / name
    assert os.access(path, os.X_OK), f"{path} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    head = path.read_text().splitlines()[:12]
    assert head[0].startswith("#!") and any("Usage" in line for line in head), head


# ----------------------------------------------------------------------------- single node

def test_single_node(fakes):
    bin_dir, log, python = fakes
    env = subprocess_env(bin_dir, FAKE_LOG=str(log), PYTHON=str(python))
    env.pop("OMP_NUM_THREADS", None)
    env.pop("NUM_GPUS", None)
    assert run([str(LAUNCH / "single_node.sh"), "--config", TINY, "train.max_steps=3"], env).returncode == 0
    assert run([str(LAUNCH / "single_node.sh"), "--num_gpus", "2", "--config", TINY, "--resume", "auto"],
               env).returncode == 0
    one, two = read_log(log)
    assert one["argv"] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29500",
                           "--module", "--no_local_rank", "cratelm", "train", "--config", TINY, "train.max_steps=3"]
    assert one["env"]["OMP_NUM_THREADS"] is None
    assert two["argv"][2:4] == ["--num_gpus", "2"] and two["argv"][-2:] == ["--resume", "auto"]
    assert two["env"]["OMP_NUM_THREADS"] == "1"      # several CPU ranks: one thread each


# ----------------------------------------------------------------------------- deepspeed multi-node

def test_deepspeed_multinode_checks_then_launches(tmp_path, fakes):
    bin_dir, log, python = fakes
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    env = subprocess_env(bin_dir, FAKE_LOG=str(log), PYTHON=str(python))
    port = str(free_port())
    cmd = [str(LAUNCH / "deepspeed_multinode.sh"), str(hf), "--no_ssh", "--node_rank", "0",
           "--master_addr", "127.0.0.1", "--master_port", port, "--", "--config", TINY, "train.micro_batch=1", "train.global_batch=4",
           "--resume", "auto"]
    r = run(cmd, env)
    assert r.returncode == 0, r.stderr
    assert "OK: no problem found" in r.stderr and "world size 4" in r.stderr
    (ds,) = [e for e in read_log(log) if e["tool"] == "fake_logger_python"]
    assert ds["argv"] == ["-m", "deepspeed.launcher.runner", "--hostfile", str(hf), "--no_ssh", "--node_rank", "0",
                          "--master_addr", "127.0.0.1", "--master_port", port, "--module", "--no_local_rank",
                          "cratelm", "train",
                          "--config", TINY, "train.micro_batch=1", "train.global_batch=4", "--resume", "auto"]


def test_deepspeed_multinode_stops_on_a_bad_launch(tmp_path, fakes):
    bin_dir, log, python = fakes
    hf = tmp_path / "hostfile"
    hf.write_text("localhost slots=2\n127.0.0.1 slot=2\n")
    env = subprocess_env(bin_dir, FAKE_LOG=str(log), PYTHON=str(python))
    r = run([str(LAUNCH / "deepspeed_multinode.sh"), str(hf), "--no_ssh", "--node_rank", "0", "--",
             "--config", TINY], env)
    assert r.returncode != 0 and f"{hf}:2: '127.0.0.1 slot=2': unknown key 'slot'" in r.stderr
    assert not [e for e in read_log(log) if e["tool"] == "fake_logger_python"]     # nothing started


# ----------------------------------------------------------------------------- torchrun multi-node

def test_torchrun_multinode(fakes):
    bin_dir, log, python = fakes
    port = free_port()
    env = subprocess_env(bin_dir, FAKE_LOG=str(log), PYTHON=str(python), NNODES="2", NODE_RANK="1",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="2")
    r = run([str(LAUNCH / "torchrun_multinode.sh"), "--config", TINY, "train.micro_batch=1",
             "train.global_batch=8", "--resume", "auto"], env)
    assert r.returncode == 0, r.stderr
    (tr,) = [e for e in read_log(log) if e["tool"] == "fake_logger_python"]
    assert tr["argv"] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--node_rank=1",
                          "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "cratelm", "train",
                          "--config", TINY, "train.micro_batch=1", "train.global_batch=8", "--resume", "auto"]
    assert tr["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "100"
    # c10d: no node rank; a batch that does not divide over 2 x 2 ranks stops it first
    env.update(RDZV="c10d", RDZV_ID="job9")
    del env["NODE_RANK"]
    r = run([str(LAUNCH / "torchrun_multinode.sh"), "--config", TINY, "train.micro_batch=1",
             "train.global_batch=6"], env)
    assert r.returncode != 0 and "train.global_batch=6 is not divisible" in r.stderr and "(= 4;" in r.stderr
    env["SKIP_CHECK"] = "1"
    assert run([str(LAUNCH / "torchrun_multinode.sh"), "--config", TINY], env).returncode == 0
    tr = [e for e in read_log(log) if e["tool"] == "fake_logger_python"][-1]
    assert "--rdzv_backend=c10d" in tr["argv"] and f"--rdzv_endpoint=127.0.0.1:{port}" in tr["argv"]
    assert "--rdzv_id=job9" in tr["argv"] and not any(a.startswith("--node_rank") for a in tr["argv"])
    env.pop("NNODES")
    r = run([str(LAUNCH / "torchrun_multinode.sh"), "--config", TINY], env)
    assert r.returncode != 0 and "set NNODES" in r.stderr


# ----------------------------------------------------------------------------- SLURM

def is_torchrun(e: dict) -> bool:
    """A per-node `$PYTHON -m torch.distributed.run ...` (the sbatch script's torchrun)."""
    return e["tool"] == "fake_logger_python" and e.get("argv", [])[:2] == ["-m", "torch.distributed.run"]


def test_slurm_two_nodes_torchrun_per_node(fakes):
    bin_dir, log, python = fakes
    env = slurm_env(bin_dir, log, ["gpu-a17", "gpu-b03"], job_id=4242, PYTHON=str(python), GPUS_PER_NODE="4",
                    SKIP_CHECK="1", SLURM_CPUS_PER_TASK="16", RUN_DIR="/nonexistent")
    r = run(["bash", str(LAUNCH / "slurm.sbatch"), "--config", TINY, "train.max_steps=5"], env)
    assert r.returncode == 0, r.stderr
    entries = read_log(log)
    assert {"tool": "scontrol", "argv": "show hostnames fake[2]"} in entries
    (srun,) = [e for e in entries if e["tool"] == "srun"]
    assert srun["argv"][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "-m cratelm.launch_guard --stop-ok -- " in srun["argv"][5]      # torchrun under the guard
    runs = sorted(filter(is_torchrun, entries), key=lambda e: e["env"]["SLURM_NODEID"])
    assert len(runs) == 2
    for node, e in enumerate(runs):
        assert e["argv"] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=4", f"--node_rank={node}", "--master_addr=gpu-a17",
                             "--master_port=14242", "-m", "cratelm", "train", "--config", TINY,
                             "train.max_steps=5", "--resume", "auto"]
        assert e["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "100"
    assert not any(e["tool"] == "scontrol" and "requeue" in e["argv"] for e in entries)   # no signal: no requeue


def test_slurm_one_task_per_gpu(fakes):
    bin_dir, log, python = fakes
    env = slurm_env(bin_dir, log, ["gpu-a17", "gpu-b03"], job_id=77, PYTHON=str(python), MODE="tasks",
                    SLURM_NTASKS_PER_NODE="2", SKIP_CHECK="1", RUN_DIR="/nonexistent")
    r = run(["bash", str(LAUNCH / "slurm.sbatch"), "--config", TINY], env)
    assert r.returncode == 0, r.stderr
    ranks = sorted((e for e in read_log(log) if e["tool"] == "fake_logger_python"), key=lambda e: int(e["env"]["RANK"]))
    assert [(e["env"]["RANK"], e["env"]["LOCAL_RANK"], e["env"]["WORLD_SIZE"], e["env"]["LOCAL_WORLD_SIZE"])
            for e in ranks] == [("0", "0", "4", "2"), ("1", "1", "4", "2"), ("2", "0", "4", "2"), ("3", "1", "4", "2")]
    for e in ranks:
        assert e["argv"] == ["-u", "-m", "cratelm", "train", "--config", TINY, "--resume", "auto"]
        assert (e["env"]["MASTER_ADDR"], e["env"]["MASTER_PORT"]) == ("gpu-a17", "10077")
    # per-task GPU binding (--gpus-per-task=1): each task sees one GPU, which is its device 0
    log.write_text("")
    env["CUDA_VISIBLE_DEVICES"] = "5"
    r = run(["bash", str(LAUNCH / "slurm.sbatch"), "--config", TINY], env)
    assert r.returncode == 0, r.stderr
    ranks = sorted((e for e in read_log(log) if e["tool"] == "fake_logger_python"), key=lambda e: int(e["env"]["RANK"]))
    assert [(e["env"]["LOCAL_RANK"], e["env"]["LOCAL_WORLD_SIZE"]) for e in ranks] == [("0", "2")] * 4


def test_slurm_refuses_a_bad_launch_before_srun(fakes):
    bin_dir, log, python = fakes
    # the batch shell runs on the first node, the master: localhost here, so the port probe passes
    env = slurm_env(bin_dir, log, ["localhost", "gpu-b03"], PYTHON=str(python), GPUS_PER_NODE="2",
                    MASTER_PORT=str(free_port()))
    r = run(["bash", str(LAUNCH / "slurm.sbatch"), "--config", TINY, "train.micro_batch=3",
             "train.global_batch=16"], env)
    assert r.returncode == 2, r.stderr
    assert "train.global_batch=16 is not divisible by train.micro_batch=3 x data-parallel size 4 (= 12" in r.stdout
    assert not [e for e in read_log(log) if e["tool"] == "srun" or is_torchrun(e)]


def sbatch_then_signal(env: dict, log: Path, sig: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Start the sbatch script, wait until both nodes' torchrun started, signal the batch shell."""
    log.write_text("")
    p = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config", TINY, *extra], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len([e for e in read_log(log) if is_torchrun(e)]) < 2:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.1)
    p.send_signal(sig)
    return p, p.communicate(timeout=60)[1]


def requeued(log: Path) -> bool:
    return any(e["tool"] == "scontrol" and "requeue" in e["argv"] for e in read_log(log))


def test_slurm_warning_signals_the_steps_then_requeues(fakes, tmp_path):
    """USR1 (--signal=B:USR1@120) -> `scancel --signal=TERM JOBID` -> the tasks (never srun, which
    would SIGKILL them) -> checkpoint, status.json "preempted" -> requeue. A plain scancel's
    SIGTERM checkpoints the same way but does not requeue."""
    bin_dir, log, python = fakes
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = slurm_env(bin_dir, log, ["gpu-a17", "gpu-b03"], job_id=555, PYTHON=str(python), GPUS_PER_NODE="1",
                    SKIP_CHECK="1", FAKE_SLEEP="60", FAKE_EXIT_ON_TERM="75", FAKE_STATUS="preempted",
                    FAKE_RUN_DIR=str(run_dir), RUN_DIR=str(run_dir))
    TINY_RUN = ["train.run_dir=" + str(run_dir)]
    p, err = sbatch_then_signal(env, log, signal.SIGUSR1, TINY_RUN)
    entries = read_log(log)
    assert {"tool": "scancel", "argv": "--signal=TERM 555"} in entries
    assert [e["signal"] for e in entries if "signal" in e] == ["SIGTERM", "SIGTERM"]    # both nodes' torchrun
    assert "forcing job termination" not in err
    assert "stopped with 75 after SIGTERM; reporting 0" in err      # --kill-on-bad-exit spares the others
    assert {"tool": "scontrol", "argv": "requeue 555"} in entries and "requeueing job 555" in err
    assert p.returncode == 0, err
    # a plain scancel: SIGTERM to the batch shell (and to the steps): checkpoint, no requeue
    p, err = sbatch_then_signal(env, log, signal.SIGTERM, TINY_RUN)
    assert "cancelled: no requeue" in err and not requeued(log) and p.returncode == 75, err
    # MAX_REQUEUES reached: no more requeues
    env.update(SLURM_RESTART_COUNT="2", MAX_REQUEUES="2")
    p, err = sbatch_then_signal(env, log, signal.SIGUSR1, TINY_RUN)
    assert not requeued(log) and "not again" in err
    # the ranks finished on the signal (training had just ended): nothing to requeue
    env.update(SLURM_RESTART_COUNT="0", FAKE_EXIT_ON_TERM="0", FAKE_STATUS="finished")
    p, err = sbatch_then_signal(env, log, signal.SIGUSR1, TINY_RUN)
    assert p.returncode == 0 and "status 'finished'); no requeue" in err and not requeued(log), err


# ----------------------------------------------------------------------------- cratelm.launch_guard

def test_guard_exit_status_and_a_lost_console(tmp_path):
    env = subprocess_env()
    guard = [sys.executable, "-m", "cratelm.launch_guard"]
    code = [sys.executable, "-c", "import sys; sys.exit(int(sys.argv[1]))"]
    assert subprocess.run([*guard, "--", *code, "75"], env=env).returncode == 75
    assert subprocess.run([*guard, "--stop-ok", "--", *code, "75"], env=env).returncode == 0   # checkpointed
    assert subprocess.run([*guard, "--stop-ok", "--", *code, "3"], env=env).returncode == 3    # a real failure
    # a writer whose reader went away: BrokenPipeError without the guard, exit 0 with it
    writer = ("import sys, time\n{guard}\nprint('first', flush=True)\ntime.sleep(0.5)\n"
              "for i in range(2000): print('line', i)\nsys.stderr.write('done\\n')\n")
    for guarded in (False, True):
        text = writer.format(guard="from cratelm.launch_guard import guard_console; guard_console()" if guarded else "")
        p = subprocess.Popen([sys.executable, "-u", "-c", text], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "first\n"
        p.stdout.close()                                    # the console is gone
        err = p.stderr.read()
        p.wait(timeout=60)
        if guarded:
            assert p.returncode == 0 and err == "done\n", err
        else:
            assert p.returncode != 0 and "BrokenPipeError" in err
