"""Helpers for the launch tests: the repository root, a subprocess environment in which
`python -m cratelm`, `torchrun` and `deepspeed` work without `pip install -e .`, and
stand-ins for the SLURM tools (srun, scontrol, scancel) that log their arguments, for the
fast checks (the real SLURM, sshd/pdsh and OpenMPI are set up by tests/launch/realtools.py)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from cratelm.dist import free_port  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def subprocess_env(*path_first: Path, **extra: str) -> dict[str, str]:
    """os.environ + cratelm importable + the venv's bin on PATH (after ``path_first``) +
    one thread per rank on the CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = os.pathsep.join([*map(str, path_first), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(extra)
    return env


# A fake srun: logs its argv (one JSON line to $FAKE_LOG), then starts each task of the step
# locally with the task's SLURM_* variables (their pids in $FAKE_LOG.tasks, for scancel) and
# exits with the first non-zero task status. Like real srun, it answers SIGTERM/SIGINT with
# "forcing job termination": SIGKILL of every task (no checkpoint can be written then).
FAKE_SRUN = r"""#!{python}
import json, os, signal, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("-"):
    a = args.pop(0)
    k, _, v = a.partition("=")
    opts[k] = v
nodes = int(opts.get("--nodes") or os.environ["SLURM_NNODES"])
per_node = int(opts.get("--ntasks-per-node") or os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
hosts = os.environ.get("FAKE_HOSTS", "").split()
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"tool": "srun", "argv": sys.argv[1:]}}) + "\n")
procs = []
def force(sig, frame):
    print("srun: forcing job termination", file=sys.stderr, flush=True)
    for p in procs:
        if p.poll() is None:
            p.kill()
signal.signal(signal.SIGTERM, force)
signal.signal(signal.SIGINT, force)
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node * per_node + local),
                   SLURM_LOCALID=str(local), SLURM_NTASKS=str(nodes * per_node),
                   SLURM_STEP_TASKS_PER_NODE=f"{{per_node}}(x{{nodes}})",
                   SLURMD_NODENAME=hosts[node] if node < len(hosts) else f"node{{node}}")
        procs.append(subprocess.Popen(args, env=env))
with open(log + ".tasks", "w") as f:
    f.write("".join(f"{{p.pid}}\n" for p in procs))
codes = [p.wait() for p in procs]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c != 0), 0))
"""

# scontrol: `show hostnames LIST` prints $FAKE_HOSTS one per line; every call is logged.
FAKE_SCONTROL = r"""#!/bin/bash
printf '{"tool": "scontrol", "argv": "%s"}\n' "$*" >> "$FAKE_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then
    for h in $FAKE_HOSTS; do echo "$h"; done
fi
"""

# scancel --signal=SIG JOBID: as slurmstepd does, the signal goes to the step's tasks (not to
# srun, not to the batch shell); every call is logged.
FAKE_SCANCEL = r"""#!/bin/bash
printf '{"tool": "scancel", "argv": "%s"}\n' "$*" >> "$FAKE_LOG"
sig=TERM
for a in "$@"; do case "$a" in --signal=*) sig=${a#--signal=};; esac; done
[[ -s "$FAKE_LOG.tasks" ]] && while read -r pid; do kill -s "$sig" "$pid" 2>/dev/null; done < "$FAKE_LOG.tasks"
exit 0
"""


@pytest.fixture
def slurm_shims(tmp_path):
    """A directory holding fake srun, scontrol and scancel, and the log they append to."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scancel").write_text(FAKE_SCANCEL)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "fake.log"
    log.touch()
    return bin_dir, log


def write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def slurm_env(bin_dir: Path, log: Path, hosts: list[str], job_id: int = 4242, **extra: str) -> dict[str, str]:
    """The variables SLURM sets in a batch job on ``len(hosts)`` nodes, and the shims' own."""
    return subprocess_env(bin_dir, FAKE_LOG=str(log), FAKE_HOSTS=" ".join(hosts), SLURM_JOB_ID=str(job_id),
                          SLURM_NNODES=str(len(hosts)), SLURM_JOB_NODELIST=f"fake[{len(hosts)}]",
                          SLURM_SUBMIT_DIR=str(REPO), **extra)


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The training tests' tiny learnable corpus (tests/train/conftest.py)."""
    from train.conftest import write_corpus     # tests/ is on sys.path (rootdir-relative imports)

    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


def train_overrides(corpus: Path, run_dir: Path, **kw) -> list[str]:
    """The tiny CPU job: fp32 (exact on CPU), ZeRO-2, torch AdamW, a record every step."""
    base = {
        "data.train": str(corpus), "train.run_dir": str(run_dir), "train.precision": "fp32",
        "train.zero_stage": 2, "train.micro_batch": 2, "train.global_batch": 4, "train.max_steps": 6,
        "train.log_interval": 1, "train.eval_interval": 0, "train.diag_interval": 0, "train.ckpt_interval": 0,
        "optim.warmup_steps": 2, "optim.lr": 3e-3, "optim.min_lr": 3e-4,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- real tools

def _alive(pid_file: str) -> bool:
    try:
        os.kill(int(Path(pid_file).read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _bring_up(script: str, pid_files: list[str]):
    """Run tests/launch/SCRIPT (idempotent: installs the Debian packages and starts the daemons
    when missing); yield; then stop what it started. Skips, saying why, when not root or when
    the set-up fails (no apt, no network to Debian's mirrors)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip(f"tests/launch/{script} needs root (it installs packages and starts daemons)")
    running = all(_alive(f) for f in pid_files)
    r = subprocess.run(["bash", str(Path(__file__).parent / script)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"tests/launch/{script} failed (exit {r.returncode}): {(r.stdout + r.stderr).strip()[-600:]}")
    yield
    if not running:
        subprocess.run(["bash", str(Path(__file__).parent / script), "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def real_slurm():
    """A real single-host SLURM 22.05 (slurmctld, slurmd, munge on 127.0.0.1)."""
    yield from _bring_up("slurm_local.sh", ["/run/slurmctld.pid", "/run/slurmd.pid"])


@pytest.fixture(scope="session")
def real_ssh():
    """node0 = 127.0.0.1, node1 = 127.0.0.2 through a loopback-only sshd, pdsh and OpenMPI."""
    yield from _bring_up("ssh_local.sh", ["/run/sshd-cratelm-local.pid"])


def pids_mentioning(text: str) -> list[int]:
    """Processes (other than this one) whose command line contains ``text``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                out.append(int(entry))
    return out
