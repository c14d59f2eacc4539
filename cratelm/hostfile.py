"""The hostfile and the resource selection, read as DeepSpeed's runner reads them.

Where DeepSpeed has a function for it, this module calls it: the include/exclude filter
(``parse_inclusion_exclusion``) and ``--num_nodes``/``--num_gpus`` (``apply_num_nodes_and_gpus``).
The hostfile is read with DeepSpeed's own line grammar (``^(\\S+)\\s+slots=(\\d+)``, ``#``
comments, blank lines) but every bad line is reported with file:line, and ``slots=0`` is
refused (DeepSpeed accepts it and then fails later or silently drops the host). The rank
order and the environment exported to every node follow ``deepspeed.launcher`` too.

``cratelm.launch_check`` builds and checks the per-node commands on top of these.
"""

from __future__ import annotations

import collections
import os
import re

# deepspeed.launcher.runner._parse_hostfile's pattern, matched with re.search on the stripped line.
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


class LaunchError(ValueError):
    """Bad launch input; the message names the file and line, or the flag and the value."""


# ----------------------------------------------------------------------------- hostfile

def read_hostfile(path: str | os.PathLike) -> tuple[dict[str, int], list[str], list[str]]:
    """Parse a DeepSpeed/MPI-style hostfile: ``(pool, problems, warnings)``.

    ``pool`` maps host -> slots in file order (what DeepSpeed's ``fetch_hostfile`` returns for
    a good file); every bad line is a problem naming ``file:line``, not just the first.
    """
    path = str(path)
    if not os.path.isfile(path):
        return {}, [f"hostfile {path} does not exist (DeepSpeed would silently run on this machine only)"], []
    pool: dict[str, int] = collections.OrderedDict()
    first_seen: dict[str, int] = {}
    problems: list[str] = []
    warnings: list[str] = []
    with open(path) as fd:
        lines = fd.readlines()
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f"{path}:{n}"
        if line.startswith("#") or line == "":
            continue
        m = HOSTFILE_LINE.search(line)
        if not m:
            problems.append(f"{where}: {line!r}: {_diagnose_hostfile_line(line)}")
            continue
        host, slots = m.group(1), int(m.group(2))
        rest = line[m.end():].strip()
        if rest and not rest.startswith("#"):
            warnings.append(f"{where}: DeepSpeed reads {host} slots={slots} and ignores the rest, {rest!r}")
        if slots == 0:
            problems.append(f"{where}: {line!r}: slots=0, a host needs at least one slot "
                            f"(delete the line, or keep it and --exclude {host})")
        if host in first_seen:
            problems.append(f"{where}: host {host!r} is already listed on line {first_seen[host]} "
                            "(DeepSpeed refuses duplicate hosts)")
            continue
        first_seen[host] = n
        pool[host] = slots
    if not pool and not problems:
        problems.append(f"{path}: no hosts (every line is blank or a comment); write 'HOSTNAME slots=N' lines")
    return pool, problems, warnings


def _diagnose_hostfile_line(line: str) -> str:
    words = line.split()
    if len(words) == 1:
        return "no slot count; write 'HOSTNAME slots=N'"
    key, eq, value = words[1].partition("=")
    if not eq:
        return f"expected 'slots=N' after the host name, got {words[1]!r}"
    if key != "slots":
        return f"unknown key {key!r} (DeepSpeed reads only 'slots=N'; a typo of 'slots'?)"
    if not value:
        return "slots= has no value; write slots=N with N >= 1"
    return f"slots={value!r} is not a whole number"


def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """``read_hostfile`` that raises LaunchError listing every problem."""
    pool, problems, _ = read_hostfile(path)
    if problems:
        raise LaunchError("; ".join(problems))
    return pool


# ----------------------------------------------------------------------------- resources

def select_resources(pool: dict[str, int], include: str = "", exclude: str = "",
                     num_nodes: int = -1, num_gpus: int = -1) -> dict[str, list[int]]:
    """Apply --include/--exclude/--num_nodes/--num_gpus exactly as DeepSpeed's runner does.

    Returns host -> slot ids in hostfile order; raises LaunchError naming the flag and value.
    Beyond DeepSpeed, it refuses --num_nodes above the host count and --num_gpus above a
    host's slots (DeepSpeed would quietly use fewer nodes, or more ranks than slots).
    """
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    if (num_nodes >= 0 or num_gpus >= 0) and (include or exclude):
        raise LaunchError("--num_nodes/--num_gpus cannot be combined with --include/--exclude "
                          "(DeepSpeed refuses it: 'Cannot specify num_nodes/gpus with include/exclude')")
    if include and exclude:
        raise LaunchError("--include and --exclude are mutually exclusive")
    try:
        active = parse_inclusion_exclusion(pool, include, exclude)
    except (ValueError, KeyError) as e:
        flag, value = ("--include", include) if include else ("--exclude", exclude)
        msg = str(e)
        if "invalid literal" in msg or "unpack" in msg:
            msg = "write HOST[:SLOT[,SLOT...]][@HOST...], e.g. 'worker-0:0,1@worker-1'"
        raise LaunchError(f"{flag} {value!r}: {msg} (hosts in the hostfile: {', '.join(pool) or 'none'})") from None
    if num_nodes > len(active):
        raise LaunchError(f"--num_nodes {num_nodes} but only {len(active)} host(s) are available: {', '.join(active)}")
    if num_nodes == 0 or num_gpus == 0:
        raise LaunchError(f"--num_nodes {num_nodes} / --num_gpus {num_gpus}: must be >= 1 when given")
    trimmed = apply_num_nodes_and_gpus(active, num_nodes, num_gpus)
    if num_gpus > 0:
        short = [f"{h} (slots={pool[h]})" for h in trimmed if pool.get(h, num_gpus) < num_gpus]
        if short:
            raise LaunchError(f"--num_gpus {num_gpus} is more than the slots of {', '.join(short)}")
    if not trimmed:
        raise LaunchError(f"--include {include!r} / --exclude {exclude!r} leave no slots to run on")
    return collections.OrderedDict((h, list(s)) for h, s in trimmed.items())


# ----------------------------------------------------------------------------- ranks and environment

def rank_ranges(active: dict[str, list[int]]) -> dict[str, list[int]]:
    """host -> its global ranks; ranks follow hostfile order, as in ``deepspeed.launcher.launch``."""
    out, r = {}, 0
    for h, slots in active.items():
        out[h] = list(range(r, r + len(slots)))
        r += len(slots)
    return out


def deepspeed_exports(problems: list[str]) -> dict[str, str]:
    """The variables DeepSpeed's runner exports to every node (pdsh/openmpi): PYTHON*, MLFLOW*,
    MV2*, UCX* and the accelerator's (NCCL* on CUDA) from this environment, plus
    ``.deepspeed_env`` in ~ and in the current directory. Lines the runner would crash on
    (blank, no '=') are problems here."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    env = os.environ.copy()
    cwd = os.path.abspath(".")
    env["PYTHONPATH"] = cwd + (":" + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    prefixes = runner.EXPORT_ENVS + get_accelerator().export_envs()
    exports = {k: v for k, v in env.items() if any(k.startswith(p) for p in prefixes)}
    for d in runner.DEEPSPEED_ENVIRONMENT_PATHS:
        f = os.path.join(d, runner.DEEPSPEED_ENVIRONMENT_NAME)
        if not os.path.isfile(f):
            continue
        with open(f) as fd:
            for n, line in enumerate(fd.readlines(), 1):
                if "=" not in line:
                    problems.append(f"{f}:{n}: {line.rstrip()!r} has no '=': DeepSpeed's runner stops on it "
                                    "(every line must be NAME=value; no blank lines, no comments)")
                    continue
                key, val = line.split("=", 1)
                if key.strip().startswith("#") or not key.strip().isidentifier():
                    problems.append(f"{f}:{n}: {key.strip()!r} is not a variable name "
                                    "(DeepSpeed would export it as-is; comments are not allowed)")
                exports[key.strip()] = val
    return exports
