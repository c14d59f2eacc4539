"""The commands each node of a launch runs, built with the launchers' own code where they
have it: DeepSpeed's ``encode_world_info`` and ``PDSHRunner``/``OpenMPIRunner.get_cmd``, and
torchrun's flags. ``cratelm.launch_check`` checks them; nothing here starts anything."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from cratelm.hostfile import deepspeed_exports, rank_ranges, read_hostfile
from cratelm.launch_probes import is_this_host

# What DeepSpeed is asked to start on every rank: ``python -u -m cratelm train ...``.
# --no_local_rank: cratelm's CLI takes the subcommand first, and DeepSpeed would insert
# ``--local_rank=N`` before it (``python -m cratelm --local_rank=0 train``); LOCAL_RANK is in
# the environment of every rank either way.
DS_USER_FLAGS = ["--module", "--no_local_rank"]
USER_MODULE = "cratelm"



@dataclasses.dataclass
class NodeCommand:
    """What one node runs."""

    node_rank: int
    host: str
    slots: list[int]
    ranks: list[int]
    shell: str
    """The command line as a shell would run it on that node."""


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


def deepspeed_commands(a: argparse.Namespace, active: dict[str, list[int]], user_args: list[str],
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
        exported = dict(cmd[i + 1].split("=", 1) for i, w in enumerate(cmd[:-1]) if w == "-x" and "=" in cmd[i + 1])
        want = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(a.master_port)}
        if any(exported.get(k) != v for k, v in want.items()):
            problems.append("--launcher openmpi: DeepSpeed's openmpi runner does not pass MASTER_ADDR/MASTER_PORT to "
                            "the ranks (they would stop: 'started by mpirun without MASTER_ADDR'); add --launcher_args "
                            f"'-x MASTER_ADDR={master_addr} -x MASTER_PORT={a.master_port}' "
                            "(launch/deepspeed_multinode.sh does) or put both in .deepspeed_env")
        notes.append("openmpi: mpirun starts every rank itself (no deepspeed.launcher.launch); the ranks take their "
                     "rank from OMPI_COMM_WORLD_* (no mpi4py needed) and their environment only from -x exports "
                     "(.deepspeed_env, PYTHON*); as root mpirun needs --launcher_args=--allow-run-as-root")
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
    if not a.dry_run and not is_this_host(h):
        problems.append(f"only one host is selected, {h}, and it is not this machine: DeepSpeed would run the "
                        "job here, not on it (add --force_multi to go through pdsh/ssh, or run it on that host)")
    return you_run, None, [NodeCommand(0, h, s, ranks[h], local(None))]


def _ds_cli_flags(a: argparse.Namespace, master_addr: str) -> list[str]:
    """The `deepspeed` flags for these arguments (what you type, and what DeepSpeed parses)."""
    out = ["--hostfile", a.hostfile]
    for flag, value in (("--include", a.include), ("--exclude", a.exclude), ("--venv_script", a.venv_script),
                        ("--ssh_port", a.ssh_port), ("--enable_each_rank_log", a.enable_each_rank_log)):
        if value:
            out += [flag, str(value)]
    if a.launcher_args:     # one word: a value such as '--allow-run-as-root' must not read as a flag
        out.append(f"--launcher_args={a.launcher_args}")
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


def torchrun_commands(a: argparse.Namespace, active: dict[str, list[int]], user_args: list[str],
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
