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

Where DeepSpeed has a function for it, this module calls it: ``encode_world_info`` and
``PDSHRunner``/``OpenMPIRunner.get_cmd``. Reading the hostfile and applying
--include/--exclude/--num_nodes/--num_gpus as DeepSpeed's runner does is the job of
``cratelm.hostfile``, whose public names stay importable from here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import json
import os
import shlex
import shutil
import socket
import sys

from cratelm.dist import free_port
from cratelm.hostfile import LaunchError, deepspeed_exports, rank_ranges, read_hostfile, select_resources
# re-exported: tests and scripts import these from here
from cratelm.hostfile import HOSTFILE_LINE, parse_hostfile  # noqa: F401

DEFAULT_MASTER_PORT = 29500  # deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT
LAUNCHERS = ("pdsh", "openmpi", "torchrun")

# What DeepSpeed is asked to start on every rank: ``python -u -m cratelm train ...``.
# --no_local_rank: cratelm's CLI takes the subcommand first, and DeepSpeed would insert
# ``--local_rank=N`` before it (``python -m cratelm --local_rank=0 train``); LOCAL_RANK is in
# the environment of every rank either way.
DS_USER_FLAGS = ["--module", "--no_local_rank"]
USER_MODULE = "cratelm"


# ----------------------------------------------------------------------------- plan

@dataclasses.dataclass
class NodeCommand:
    """What one node runs."""

    node_rank: int
    host: str
    slots: list[int]
    ranks: list[int]
    shell: str
    """The command line as a shell would run it on that node."""


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


def train_args(config: list[str], overrides: list[str], resume: str | None = None) -> list[str]:
    """``train --config FILES... key=value... [--resume MODE]``: the arguments of every rank."""
    out = ["train"]
    if config:
        out += ["--config", *config]
    out += list(overrides)
    if resume:
        out += ["--resume", resume]
    return out


def _ds_args(a: argparse.Namespace, user_args: list[str], master_addr: str) -> argparse.Namespace:
    """DeepSpeed's own argument namespace for these flags (its defaults, its spelling)."""
    from deepspeed.launcher.runner import parse_args

    return parse_args(_ds_cli_flags(a, master_addr) + DS_USER_FLAGS + [USER_MODULE] + user_args)


def _deepspeed_plan(a: argparse.Namespace, active: dict[str, list[int]], user_args: list[str],
                    master_addr: str, problems: list[str], notes: list[str]) -> tuple[str, str | None, list[NodeCommand]]:
    from deepspeed.launcher.multinode_runner import OpenMPIRunner, PDSHRunner
    from deepspeed.launcher.runner import encode_world_info

    ds = _ds_args(a, user_args, master_addr)
    world_info = encode_world_info(active)
    you_run = shlex.join(["deepspeed", *_ds_cli_flags(a, master_addr), *DS_USER_FLAGS, USER_MODULE, *user_args])
    ranks = rank_ranges(active)
    multi = (a.force_multi or len(active) > 1) and not a.no_ssh

    if a.launcher == "openmpi" and multi:
        pool, _, _ = read_hostfile(a.hostfile)
        try:
            runner = OpenMPIRunner(ds, world_info, pool)
        except ValueError as e:
            problems.append(f"--launcher openmpi: {e}")
            return you_run, None, []
        for k, v in deepspeed_exports(problems).items():
            runner.add_export(k, v)
        cmd = runner.get_cmd(os.environ.copy(), active)
        notes.append("openmpi: mpirun starts every rank itself (no deepspeed.launcher.launch); the ranks find "
                     "each other through OMPI_COMM_WORLD_* and need mpi4py installed on every node")
        nodes = [NodeCommand(i, h, s, ranks[h], f"(started by mpirun: ranks {ranks[h][0]}-{ranks[h][-1]})")
                 for i, (h, s) in enumerate(active.items())]
        return you_run, shlex.join(cmd), nodes

    if multi:   # pdsh from the head node; %n becomes each node's rank
        runner = PDSHRunner(ds, world_info)
        for k, v in deepspeed_exports(problems).items():
            runner.add_export(k, v)
        cmd, _kill, _env = runner.get_cmd(os.environ.copy(), active)
        n_pdsh = 6 + len(shlex.split(ds.launcher_args))   # pdsh -S -f N -w HOSTS [launcher_args]
        head = shlex.join(cmd[:n_pdsh]) + " " + shlex.quote(" ".join(cmd[n_pdsh:]))
        remote = " ".join(cmd[n_pdsh:])
        nodes = [NodeCommand(i, h, s, ranks[h], remote.replace("--node_rank=%n", f"--node_rank={i}"))
                 for i, (h, s) in enumerate(active.items())]
        return you_run, head, nodes

    # one host, or --no_ssh: DeepSpeed's runner starts the per-node launcher itself, locally
    # (this list is built inline in deepspeed.launcher.runner.main; kept in its order).
    def local(rank: int | None) -> str:
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
               f"--master_addr={master_addr}", f"--master_port={a.master_port}"]
        if rank is not None:
            cmd.append(f"--node_rank={rank}")
        cmd += DS_USER_FLAGS + [f"--enable_each_rank_log={ds.enable_each_rank_log}", f"--log_level={ds.log_level}"]
        return shlex.join(cmd + [USER_MODULE] + user_args)

    if a.no_ssh:
        notes.append("--no_ssh: run the `deepspeed` command on every node with its own --node_rank; every node "
                     "needs the same hostfile (it defines the world) and its own environment (nothing is exported)")
        nodes = [NodeCommand(i, h, s, ranks[h], local(i)) for i, (h, s) in enumerate(active.items())]
        you_run = you_run.replace(f"--node_rank {a.node_rank}", "--node_rank NODE_RANK")
        return you_run, None, nodes
    h, s = next(iter(active.items()))
    notes.append(f"one host ({h}): DeepSpeed starts the per-node launcher on this machine, without pdsh/ssh")
    if not a.dry_run and not _is_this_host(h):
        problems.append(f"only one host is selected, {h}, and it is not this machine: DeepSpeed would run the "
                        "job here, not on it (add --force_multi to go through pdsh/ssh, or run it on that host)")
    return you_run, None, [NodeCommand(0, h, s, ranks[h], local(None))]


def _ds_cli_flags(a: argparse.Namespace, master_addr: str) -> list[str]:
    """The `deepspeed` flags for these arguments (what you type, and what DeepSpeed parses)."""
    out = ["--hostfile", a.hostfile]
    for flag, value in (("--include", a.include), ("--exclude", a.exclude), ("--launcher_args", a.launcher_args),
                        ("--venv_script", a.venv_script), ("--ssh_port", a.ssh_port)):
        if value:
            out += [flag, str(value)]
    if a.num_nodes >= 0:
        out += ["--num_nodes", str(a.num_nodes)]
    if a.num_gpus >= 0:
        out += ["--num_gpus", str(a.num_gpus)]
    if a.launcher != "pdsh":
        out += ["--launcher", a.launcher]
    if a.no_ssh:
        out += ["--no_ssh", "--node_rank", str(a.node_rank)]
    if a.force_multi:
        out.append("--force_multi")
    return out + ["--master_addr", master_addr, "--master_port", str(a.master_port)]


def _torchrun_plan(a: argparse.Namespace, active: dict[str, list[int]], user_args: list[str],
                   master_addr: str) -> tuple[str, None, list[NodeCommand]]:
    ranks = rank_ranges(active)
    nodes = []
    for i, (h, slots) in enumerate(active.items()):
        env = [] if slots == list(range(len(slots))) else [f"CUDA_VISIBLE_DEVICES={','.join(map(str, slots))}"]
        cmd = ["torchrun", f"--nnodes={len(active)}", f"--nproc_per_node={len(slots)}"]
        if a.rdzv_backend == "c10d":
            cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={master_addr}:{a.master_port}", f"--rdzv_id={a.rdzv_id}"]
        else:
            cmd += [f"--node_rank={i}", f"--master_addr={master_addr}", f"--master_port={a.master_port}"]
        nodes.append(NodeCommand(i, h, slots, ranks[h], shlex.join(env + cmd + ["-m", USER_MODULE] + user_args)))
    you_run = "on every node: " + (nodes[0].shell.replace("--node_rank=0", "--node_rank=NODE_RANK") if nodes else "")
    return you_run, None, nodes


# ----------------------------------------------------------------------------- probes

def probe_master(addr: str, port: int, role: str = "head", timeout: float = 3.0) -> str | None:
    """A problem with the rendezvous address ``addr:port`` as seen from this host, or None.

    ``role`` says who is asking: ``head`` (the node that starts everything, e.g. pdsh's),
    ``master`` (node_rank 0 itself: the address must be this host's), ``worker`` (node_rank
    > 0: node 0 may already listen) or ``c10d`` (any node of a c10d rendezvous).
    On this host the port must be free to bind, since rank 0's store will listen there
    (a worker on the same host, as in a simulated two-node run, may find it taken by node 0).
    A remote address must answer: a refused connection means the host is up and nothing
    listens yet; silence or no route means it is unreachable from here.
    """
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"master address {addr!r} does not resolve on this host ({e.strerror})"
    family, _, _, _, sockaddr = infos[0]
    ip = sockaddr[0]
    if _is_local_address(family, ip):
        if role == "worker":
            return None
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as torch's TCPStore does
            try:
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return (f"master port {port} is already in use on this host ({addr}); "
                            f"pick another --master_port, e.g. {free_port('')}")
                return f"cannot bind master port {port} on this host ({addr}): {e.strerror}"
        return None
    if role == "master":
        return (f"this is node_rank 0, which hosts the rendezvous, but master address {addr} ({ip}) "
                "is not an address of this host")
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sockaddr)
        except ConnectionRefusedError:
            return None                 # the host answered and nothing listens yet: as it should be
        except socket.timeout:
            return (f"master {addr}:{port} is unreachable from this host: no answer in {timeout:g} s "
                    "(a firewall, or not an address of the master node?)")
        except OSError as e:
            return f"master {addr}:{port} is unreachable from this host: {e.strerror or e}"
    if role in ("worker", "c10d"):
        return None                     # node 0 (or the rendezvous host) may already be listening
    return f"master port {port} is already in use on {addr}; pick another --master_port"


def _is_local_address(family: int, ip: str) -> bool:
    """True when ``ip`` belongs to this host (binding to it succeeds)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def _is_this_host(host: str) -> bool:
    """True when ``host`` resolves to an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return any(_is_local_address(f, sa[0]) for f, _, _, _, sa in infos)


# ----------------------------------------------------------------------------- the check

def build_plan(a: argparse.Namespace) -> LaunchPlan:
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

    batch = ""
    if not a.config and not a.overrides:
        notes.append("no --config: the batch arithmetic is not checked")
    elif world_size:
        from cratelm.commands import config_from_args
        from cratelm.config import ConfigError, batch_plan

        try:
            cfg = config_from_args(a)
        except ConfigError as e:
            problems.append(f"config: {e}")
        else:
            try:
                bp = batch_plan(cfg.train, world_size)
                batch = (f"global {bp.global_batch} = micro {bp.micro_batch} x grad accum {bp.grad_accum} x "
                         f"data-parallel {bp.dp_size} (world size {world_size}, "
                         f"pipeline stages {cfg.train.pipeline_stages})")
            except ConfigError as e:
                problems.append(f"batch: {e}")

    head, you_run, nodes = None, "", []
    if active:
        if launcher == "torchrun":
            you_run, head, nodes = _torchrun_plan(a, active, user_args, master_addr)
        else:
            you_run, head, nodes = _deepspeed_plan(a, active, user_args, master_addr, problems, notes)

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
                      notes, warnings, problems)


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
                   help="extra pdsh/mpirun arguments, one quoted string (as for deepspeed)")
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
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    # DeepSpeed logs to stdout (its logger binds the stream when first imported): keep
    # stdout for the plan alone, so that `--json` output parses.
    with contextlib.redirect_stdout(sys.stderr):
        plan = build_plan(args)
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=2))
    else:
        print(format_plan(plan))
    return 1 if plan.problems else 0


if __name__ == "__main__":   # python -m cratelm.launch_check ...
    parser = argparse.ArgumentParser(prog="cratelm launch-check")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
