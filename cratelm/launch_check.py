"""``cratelm launch-check``: build a multi-node launch and check it before anything starts.

It prints the exact commands each node would run and lists every problem it can see from
here, so a typo in a hostfile or a batch that does not divide fails in a second on the
login node instead of after the allocation starts::

    cratelm launch-check --hostfile launch/hostfile --master_addr node0 \\
        --config configs/model/crate-gpt2-base.yaml configs/train/owt.yaml train.global_batch=512
    cratelm launch-check --launcher torchrun --num_nodes 2 --num_gpus 8 --master_addr node0 --config ...

Launchers (``--launcher``):

- ``pdsh`` (DeepSpeed's default): run on the head node, ``deepspeed`` reaches every host
  with ``pdsh`` + ssh and starts ``python -u -m deepspeed.launcher.launch --node_rank=%n``;
- ``pdsh --no_ssh --node_rank I``: the same per-node command, started by you on every node;
- ``openmpi``: one ``mpirun`` starts every rank (no --include/--exclude, no --num_nodes);
- ``torchrun``: one ``torchrun`` per node, static master address or ``--rdzv-backend c10d``.

The job is checked with `cratelm train`'s own checks (``check_job`` and ``ds_config``, which
train runs before any process group), for the launch's world size. Reading the hostfile and
applying --include/--exclude/--num_nodes/--num_gpus as DeepSpeed's runner does is
``cratelm.hostfile``; the per-node commands ``cratelm.launch_commands`` (with DeepSpeed's own
``encode_world_info`` and runners); the network checks ``cratelm.launch_probes``. From Python:
``check_launch(LaunchSpec(hostfile=..., master_addr=..., config=[...]))`` returns the plan.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import sys

from cratelm.hostfile import LaunchError, read_hostfile, select_resources
from cratelm.launch_commands import NodeCommand, deepspeed_commands, torchrun_commands, train_args
from cratelm.launch_probes import master_is_node0, probe_master
# re-exported: tests and scripts import these from here
from cratelm.hostfile import HOSTFILE_LINE, parse_hostfile  # noqa: F401

DEFAULT_MASTER_PORT = 29500  # deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT
LAUNCHERS = ("pdsh", "openmpi", "torchrun")

# ----------------------------------------------------------------------------- plan

@dataclasses.dataclass
class LaunchSpec:
    """The launch to check, as typed arguments (the CLI flags of the same names)."""

    hostfile: str | None = None
    include: str = ""
    exclude: str = ""
    num_nodes: int = -1
    num_gpus: int = -1
    master_addr: str = ""
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "pdsh"
    launcher_args: str = ""
    no_ssh: bool = False
    node_rank: int = -1
    force_multi: bool = False
    ssh_port: int | None = None
    venv_script: str | None = None
    enable_each_rank_log: str | None = None
    rdzv_backend: str = "static"
    rdzv_id: str = "cratelm"
    resume: str | None = None
    dry_run: bool = False
    probe_timeout: float = 3.0
    device: str = "auto"
    """auto (what torch sees here), cpu or cuda: the device `train`'s checks assume."""
    config: list[str] = dataclasses.field(default_factory=list)
    overrides: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LaunchSpec":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


@dataclasses.dataclass
class LaunchPlan:
    launcher: str
    world_size: int
    master_addr: str
    master_port: int
    you_run: str
    """The command you type (on the head node, or on every node for --no_ssh / torchrun)."""
    head: str | None
    """What the launcher runs on this host to reach the others (pdsh, mpirun), if anything."""
    nodes: list[NodeCommand]
    batch: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    run_dir: str = ""
    """train.run_dir of the config (absolute), where status.json tells how the ranks ended."""


# ----------------------------------------------------------------------------- the check

def check_launch(a: LaunchSpec | argparse.Namespace) -> LaunchPlan:
    """Parse, select, build the per-node commands and check them; never raises for bad input."""
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    launcher = a.launcher = a.launcher.lower()

    if a.hostfile:
        pool, p, w = read_hostfile(a.hostfile)
        problems += p
        warnings += w
    elif launcher == "torchrun" and a.num_nodes > 0 and a.num_gpus > 0:
        pool = collections.OrderedDict((f"node{i}", a.num_gpus) for i in range(a.num_nodes))
    else:
        pool = {}
        problems.append("no --hostfile (torchrun also accepts --num_nodes N --num_gpus G without one)")

    active: dict[str, list[int]] = {}
    if problems:
        notes.append("no commands built: fix the hostfile first")
    elif pool:
        try:
            if a.hostfile:
                active = select_resources(pool, a.include, a.exclude, a.num_nodes, a.num_gpus)
            else:
                active = collections.OrderedDict((h, list(range(s))) for h, s in pool.items())
        except LaunchError as e:
            problems.append(str(e))
    world_size = sum(len(s) for s in active.values())

    master_addr = a.master_addr or (next(iter(active)) if active else "")
    if master_addr == "localhost":
        master_addr = "127.0.0.1"
    if active and a.master_addr and (a.hostfile or a.launcher != "torchrun"):
        problem, warning = master_is_node0(a.master_addr, list(active))
        problems += [problem] if problem else []
        warnings += [warning] if warning else []
    if active and not a.master_addr:
        notes.append(f"no --master_addr: using the first host, {master_addr} (DeepSpeed itself would ask "
                     f"`ssh {next(iter(active))} hostname -I`)")
    if a.no_ssh and launcher != "pdsh":
        problems.append("--no_ssh is a variant of the pdsh launcher; drop --launcher or --no_ssh")
    if a.no_ssh and active and not 0 <= a.node_rank < len(active):
        problems.append(f"--no_ssh needs --node_rank in [0, {len(active)}), got {a.node_rank}")
    if launcher == "torchrun" and active and a.node_rank >= len(active):
        problems.append(f"--node_rank {a.node_rank} is not below the number of nodes, {len(active)}")

    try:
        overrides = [c for c in a.config if "=" in c] + list(a.overrides)
        config = [c for c in a.config if "=" not in c]
        user_args = train_args(config, overrides, a.resume)
    except Exception as e:   # pragma: no cover - argparse already validated the shapes
        problems.append(str(e))
        user_args = ["train"]

    batch, run_dir = "", ""
    if not a.config and not a.overrides:
        notes.append("no --config: the job (batch arithmetic, schedule, pipeline) is not checked")
    elif world_size:
        batch, run_dir = _check_job(a, world_size, problems)

    head, you_run, nodes = None, "", []
    if active:
        if launcher == "torchrun":
            you_run, head, nodes = torchrun_commands(a, active, user_args, master_addr)
        else:
            you_run, head, nodes = deepspeed_commands(a, active, user_args, master_addr, problems, notes)

    if not a.dry_run and active:
        multi = (a.force_multi or len(active) > 1) and not a.no_ssh
        if launcher == "pdsh" and multi and not shutil.which("pdsh"):
            problems.append("pdsh is not installed on this host: DeepSpeed would stop with \"launcher 'pdsh' not "
                            "installed\" (install pdsh, or use --no_ssh on every node, --launcher openmpi, "
                            "or launch/torchrun_multinode.sh)")
        if launcher == "openmpi" and not shutil.which("ompi_info"):
            problems.append("openmpi is not installed on this host (no ompi_info on PATH)")
        if launcher == "torchrun" and a.rdzv_backend == "c10d":
            role = "c10d"
        elif (launcher == "torchrun" or a.no_ssh) and a.node_rank >= 0:
            role = "master" if a.node_rank == 0 else "worker"
        else:
            role = "head"
        p = probe_master(master_addr, a.master_port, role, a.probe_timeout)
        if p:
            problems.append(p)
    elif a.dry_run:
        notes.append("--dry-run: the master address/port and the launcher tools were not probed")

    return LaunchPlan(launcher, world_size, master_addr, a.master_port, you_run, head, nodes, batch,
                      notes, warnings, problems, run_dir)


build_plan = check_launch


def _check_job(a: LaunchSpec | argparse.Namespace, world_size: int, problems: list[str]) -> tuple[str, str]:
    """`cratelm train`'s own checks (cratelm.train.ds_config.check_job and ds_config, which train
    runs before any process group) for this world size: ``(batch line, run_dir)``."""
    from cratelm.commands import config_from_args
    from cratelm.config import ConfigError
    from cratelm.train.ds_config import check_job, device_type, ds_config

    dev = device_type() if a.device == "auto" else a.device
    try:
        cfg = config_from_args(a)
    except ConfigError as e:
        problems.append(f"config: {e}")
        return "", ""
    try:
        bp = check_job(cfg, world_size, dev)
        ds_config(cfg, bp, dev)
    except ConfigError as e:
        hint = " (checked for a CPU: pass --device cuda when the nodes have GPUs)" if a.device == "auto" and \
            dev == "cpu" and "CPU" in str(e) else ""
        problems.append(f"job: {e}{hint}")
        return "", os.path.abspath(cfg.train.run_dir)
    return (f"global {bp.global_batch} = micro {bp.micro_batch} x grad accum {bp.grad_accum} x "
            f"data-parallel {bp.dp_size} (world size {world_size}, pipeline stages {cfg.train.pipeline_stages})",
            os.path.abspath(cfg.train.run_dir))


def format_plan(plan: LaunchPlan) -> str:
    out = []
    name = {"pdsh": "deepspeed (pdsh)", "openmpi": "deepspeed (openmpi)", "torchrun": "torchrun"}[plan.launcher]
    out.append(f"launcher: {name}, {len(plan.nodes)} node(s), world size {plan.world_size}, "
               f"master {plan.master_addr}:{plan.master_port}")
    for n in plan.nodes:
        r = f"{n.ranks[0]}-{n.ranks[-1]}" if n.ranks else "-"
        out.append(f"  node {n.node_rank}  {n.host}  slots {','.join(map(str, n.slots))}  ranks {r}")
    if plan.batch:
        out.append(f"batch: {plan.batch}")
    if plan.you_run:
        out += ["", "# you run:", plan.you_run]
    if plan.head:
        out += ["# which runs on this host:", plan.head]
    for n in plan.nodes:
        out += [f"# node {n.node_rank} ({n.host}) runs:", n.shell]
    for title, items in (("notes", plan.notes), ("warnings", plan.warnings)):
        if items:
            out += ["", f"{title}:"] + [f"  - {x}" for x in items]
    out.append("")
    if plan.problems:
        out.append(f"{len(plan.problems)} problem(s), nothing was started:")
        out += [f"  - {p}" for p in plan.problems]
    else:
        out.append("OK: no problem found")
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from cratelm.commands import add_config_arguments

    p.add_argument("-H", "--hostfile", default=None, help="'HOSTNAME slots=N' lines, as DeepSpeed reads them")
    p.add_argument("-i", "--include", default="", help="DeepSpeed's NODE_SPEC[@NODE_SPEC...], e.g. 'host1:0,1@host2'")
    p.add_argument("-e", "--exclude", default="", help="same format; these slots/hosts are left out")
    p.add_argument("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=-1,
                   help="use the first N hosts")
    p.add_argument("--num_gpus", "--num-gpus", "--num_accelerators", dest="num_gpus", type=int, default=-1,
                   help="use slots [0, G) of every host")
    p.add_argument("--master_addr", "--master-addr", dest="master_addr", default="",
                   help="address of node 0 (default: the first host)")
    p.add_argument("--master_port", "--master-port", dest="master_port", type=int, default=DEFAULT_MASTER_PORT)
    p.add_argument("--launcher", default="pdsh", type=str.lower, choices=LAUNCHERS)
    p.add_argument("--launcher_args", "--launcher-args", dest="launcher_args", default="",
                   help="extra pdsh/mpirun arguments, one quoted string (as for deepspeed); "
                        "--launcher_args=--flag for a value that starts with '-'")
    p.add_argument("--enable_each_rank_log", "--enable-each-rank-log", dest="enable_each_rank_log", default=None,
                   metavar="DIR", help="deepspeed's: each rank's output to a file in DIR (on its node)")
    p.add_argument("--no_ssh", "--no-ssh", dest="no_ssh", action="store_true",
                   help="deepspeed --no_ssh: you start the launcher on every node with its --node_rank")
    p.add_argument("--node_rank", "--node-rank", dest="node_rank", type=int, default=-1,
                   help="this node's rank (--no_ssh, or torchrun on one node: checks the master from here)")
    p.add_argument("--force_multi", "--force-multi", dest="force_multi", action="store_true")
    p.add_argument("--ssh_port", "--ssh-port", dest="ssh_port", type=int, default=None)
    p.add_argument("--venv_script", "--venv-script", dest="venv_script", default=None)
    p.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default="static",
                   choices=("static", "c10d"), help="torchrun: static master address or c10d rendezvous")
    p.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", default="cratelm", help="torchrun c10d rendezvous id")
    p.add_argument("--resume", default=None, help="passed to `cratelm train --resume` (e.g. auto)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands and check files and batch only; probe no port, host or tool")
    p.add_argument("--probe-timeout", dest="probe_timeout", type=float, default=3.0,
                   help="seconds to wait for the master address to answer")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="the nodes' device for train's checks (auto: what torch sees here)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--plan-file", dest="plan_file", default=None,
                   help="also write the plan as JSON to this file (the launch scripts read it)")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    # DeepSpeed logs to stdout (its logger binds the stream when first imported): keep
    # stdout for the plan alone, so that `--json` output parses.
    with contextlib.redirect_stdout(sys.stderr):
        plan = check_launch(LaunchSpec.from_args(args))
    if args.plan_file:
        with open(args.plan_file, "w") as f:
            json.dump(dataclasses.asdict(plan), f, indent=2)
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=2))
    else:
        print(format_plan(plan))
    return 1 if plan.problems else 0


if __name__ == "__main__":   # python -m cratelm.launch_check ...
    parser = argparse.ArgumentParser(prog="cratelm launch-check")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
