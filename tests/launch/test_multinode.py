"""Real training through the launchers, on CPU ranks (gloo), the tiny model, fp32, ZeRO-2.

- two `torchrun --nnodes 2 --node_rank {0,1}` (launch/torchrun_multinode.sh) on 127.0.0.1;
- the per-node `deepspeed.launcher.launch` commands that `cratelm launch-check` printed for
  a two-host hostfile, each run here as pdsh would run it on its host.

launch/slurm.sbatch under a real SLURM: test_slurm_real.py; pdsh/ssh and OpenMPI for real:
test_real_launchers.py.

Each two-rank run must give the losses of one process accumulating twice as many
micro-batches (same global batch), which is the reference (launch/single_node.sh, 1 rank).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import LAUNCH, REPO, free_port, read_metrics, subprocess_env, train_overrides

pytestmark = pytest.mark.distributed

TINY = str(REPO / "configs/model/tiny.yaml")
TIMEOUT = 300


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want), (got, want)
    assert len(set(want)) == len(want), "the reference losses do not change: the comparison would be empty"
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert abs(g - w) <= 1e-5 * abs(w), f"step {step}: loss {g} != {w} (single process)"


def losses(run_dir: Path) -> list[float]:
    recs = read_metrics(run_dir)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)), [r["step"] for r in recs]
    return [r["train/loss"] for r in recs]


def communicate_all(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> list[float]:
    """One process, global batch 4 = micro 2 x accum 2 (launch/single_node.sh, 1 rank)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    env = subprocess_env(MASTER_PORT=str(free_port()))
    r = subprocess.run([str(LAUNCH / "single_node.sh"), "--num_gpus", "1", "--config", TINY,
                        *train_overrides(corpus, run_dir)], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "global 4 = micro 2 x accum 2 x data-parallel 1" in r.stdout
    out = losses(run_dir)
    assert len(out) == 6
    return out


def test_two_nodes_with_torchrun_match_one_process(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    procs = [subprocess.Popen([str(LAUNCH / "torchrun_multinode.sh"), "--config", TINY,
                               *train_overrides(corpus, run_dir)],
                              env=subprocess_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=str(port), NPROC_PER_NODE="1"),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = communicate_all(procs)
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    assert "global 4 = micro 2 x accum 1 x data-parallel 2" in outs[0]
    assert "2 ranks, dp 2" in outs[0] and "ZeRO 2" in outs[0]
    assert_same_losses(losses(run_dir), reference)


def test_deepspeed_launcher_commands_from_launch_check_train(corpus, reference, tmp_path):
    """pdsh is not there: run each node's command (as pdsh would on that host) locally."""
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two 'hosts' that are both this machine\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-m", "cratelm", "launch-check", "--hostfile", str(hostfile), "--json",
                        "--dry-run", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        "--config", TINY, *train_overrides(corpus, run_dir)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    plan = json.loads(r.stdout)
    assert plan["world_size"] == 2 and plan["head"].startswith("pdsh -S -f 1024 -w localhost,127.0.0.1 ")
    nodes = plan["nodes"]
    assert [n["node_rank"] for n in nodes] == [0, 1]
    assert all(f"--node_rank={n['node_rank']} " in n["shell"] for n in nodes)
    procs = [subprocess.Popen(["bash", "-c", n["shell"]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in nodes]
    outs = communicate_all(procs)
    for n, p, out in zip(nodes, procs, outs):
        assert p.returncode == 0, f"node {n['node_rank']}:\n{out[-4000:]}"
    assert "global 4 = micro 2 x accum 1 x data-parallel 2" in outs[0]
    assert_same_losses(losses(run_dir), reference)
