#!/usr/bin/env bash
# Several machines through the DeepSpeed launcher and a hostfile ("HOSTNAME slots=N" lines,
# see launch/hostfile.example). `cratelm launch-check` runs first with the same flags and
# stops the launch if it finds a problem (SKIP_CHECK=1 skips it).
#
# Usage: launch/deepspeed_multinode.sh HOSTFILE [deepspeed flags...] -- --config FILES... [key=value ...] [--resume auto]
#
#   # pdsh (default): run once, on the head node; pdsh + passwordless ssh reach every host
#   launch/deepspeed_multinode.sh launch/hostfile --master_addr node0 -- --config ... --resume auto
#   # a subset of the hostfile: all of node0, slots 0,1 of node1 (or --exclude, --num_nodes/--num_gpus)
#   launch/deepspeed_multinode.sh launch/hostfile --include "node0@node1:0,1" -- --config ...
#   # OpenMPI: mpirun starts every rank (no --include/--exclude; as root add --launcher_args=--allow-run-as-root)
#   launch/deepspeed_multinode.sh launch/hostfile --launcher openmpi --master_addr node0 -- --config ...
#   # no ssh at all: run on EVERY node with its own rank (same hostfile everywhere)
#   launch/deepspeed_multinode.sh launch/hostfile --no_ssh --node_rank $NODE_RANK --master_addr node0 -- --config ...
#
# deepspeed flags that launch-check understands: --include --exclude --num_nodes --num_gpus
# --master_addr --master_port --launcher --launcher_args --no_ssh --node_rank --force_multi
# --ssh_port --venv_script --enable_each_rank_log (others: set SKIP_CHECK=1). The environment
# of the remote ranks: see docs/multinode.md (.deepspeed_env, OMP_NUM_THREADS, PATH, ...).
#
# Signals: SIGTERM/SIGINT/SIGHUP to this script reach the ranks (on every node, through pdsh
# for the pdsh launcher), which checkpoint at the end of the step and exit 75; the script
# waits for them and exits 75. DeepSpeed's runner runs in its own session and is never
# signalled: its handler would kill pdsh (the ranks' console) and `pkill -f` every DeepSpeed
# launcher of that python on every host. A watchdog (own session) does the same stop if this
# script is SIGKILLed. OpenMPI: the signal goes to mpirun, which kills the ranks without a
# checkpoint (no way to tell this job's ranks from another mpirun's of the same user here).
set -uo pipefail
trap '' PIPE     # a closed console (the terminal or pipe went away) must not end the script

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,20p' "${BASH_SOURCE[0]}" >&2; exit 2
fi
HOSTFILE="$1"; shift
DS_ARGS=()
while [[ $# -gt 0 && "$1" != "--" ]]; do DS_ARGS+=("$1"); shift; done
[[ $# -gt 0 ]] && shift          # the "--"
TRAIN_ARGS=("$@")

# ---- OpenMPI: DeepSpeed's runner gives mpirun no MASTER_ADDR/MASTER_PORT: pass them with -x
flag() {   # flag NAME: the value of --NAME VALUE / --NAME=VALUE in DS_ARGS
    local i
    for (( i = 0; i < ${#DS_ARGS[@]}; i++ )); do
        case "${DS_ARGS[i]}" in
            "--$1") echo "${DS_ARGS[i + 1]:-}"; return;;
            "--$1="*) echo "${DS_ARGS[i]#*=}"; return;;
        esac
    done
}
LAUNCHER="$(flag launcher | tr 'A-Z' 'a-z')"
if [[ "$LAUNCHER" == openmpi ]]; then
    ADDR="$(flag master_addr)"
    [[ -z "$ADDR" ]] && ADDR="$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { print $1; exit }')"
    PORT="$(flag master_port)"
    EXTRA="$(flag launcher_args)"
    KEEP=()
    for (( i = 0; i < ${#DS_ARGS[@]}; i++ )); do
        case "${DS_ARGS[i]}" in
            --launcher_args) (( i++ ));;
            --launcher_args=*) ;;
            *) KEEP+=("${DS_ARGS[i]}");;
        esac
    done
    DS_ARGS=("${KEEP[@]}" "--launcher_args=${EXTRA:+$EXTRA }-x MASTER_ADDR=$ADDR -x MASTER_PORT=${PORT:-29500}")
fi

# ---- check, and the plan: hosts, master port, world info (to find this job's ranks)
PLAN="$(mktemp "${TMPDIR:-/tmp}/cratelm-plan-XXXXXX")"
if [[ "${SKIP_CHECK:-0}" != 1 ]]; then
    "$PYTHON" -m cratelm launch-check --hostfile "$HOSTFILE" "${DS_ARGS[@]}" --plan-file "$PLAN" \
        "${TRAIN_ARGS[@]}" >&2 || { rm -f "$PLAN"; exit 2; }
else
    "$PYTHON" -m cratelm launch-check --dry-run --hostfile "$HOSTFILE" "${DS_ARGS[@]}" --plan-file "$PLAN" \
        "${TRAIN_ARGS[@]}" >/dev/null 2>&1
fi
# STOP_HOW: pdsh HOSTS | local | mpi HOSTS ; STOP_MATCH: what the ranks' parent runs
read -r STOP_HOW STOP_HOSTS STOP_MATCH < <("$PYTHON" - "$PLAN" <<'EOF'
import json, re, sys
try:
    plan = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("none - -"); sys.exit()
hosts = ",".join(n["host"] for n in plan["nodes"]) or "-"
wi = re.search(r"--world_info=([\w=-]+)", " ".join(n["shell"] for n in plan["nodes"]))
how = "mpi" if plan["launcher"] == "openmpi" and (plan["head"] or "").startswith("mpirun") else \
      "pdsh" if (plan["head"] or "").startswith("pdsh") else "local"
# anchored at the start: not pdsh or ssh on the head (their command lines hold the same words);
# pdsh puts each host's own rank for %n, so a host that is two "nodes" is not signalled twice
node = "--node_rank=%n " if how == "pdsh" else ""
match = (f"^[^ ]+ -u -m deepspeed[.]launcher[.]launch --world_info={wi.group(1)} {node}.*--master_port="
         f"{plan['master_port']}( |$)") if wi else "-"
print(how, hosts, match.replace(" ", "\x1f"))
EOF
)
rm -f "$PLAN"
STOP_MATCH="${STOP_MATCH//$'\x1f'/ }"
# the ranks: the children of this job's deepspeed.launcher.launch (its world info and port),
# this user's only
ME="$(id -u)"
REMOTE_STOP="for p in \$(pgrep -u $ME -f '$STOP_MATCH'); do pkill -TERM -u $ME -P \$p; done"
stop_ranks() {
    case "$STOP_HOW" in
        pdsh) PDSH_RCMD_TYPE=ssh timeout 60 pdsh -S -w "$STOP_HOSTS" "$REMOTE_STOP" >&2;;
        local) bash -c "$REMOTE_STOP";;
        mpi) kill -TERM "$RUNNER_MPIRUN" 2>/dev/null;;
        *) echo "cratelm: no plan: cannot find the ranks to stop" >&2;;
    esac
}

# = `deepspeed --hostfile ...`; --module runs `python -u -m cratelm train ...` on every rank and
# --no_local_rank keeps --local_rank=K from landing before the subcommand (LOCAL_RANK is set).
setsid "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${DS_ARGS[@]}" \
    --module --no_local_rank cratelm train "${TRAIN_ARGS[@]}" &
RUNNER=$!
RUNNER_MPIRUN="$RUNNER"     # openmpi: mpirun is the runner's child; TERM to the runner's group
[[ "$STOP_HOW" == mpi ]] && RUNNER_MPIRUN="-$RUNNER"
# the watchdog: when this script disappears (SIGKILL) while the runner still runs, stop the ranks
export -f stop_ranks
export STOP_HOW STOP_HOSTS REMOTE_STOP RUNNER_MPIRUN
setsid bash -c 'trap "" TERM INT HUP PIPE
    while kill -0 '$$' 2>/dev/null; do sleep 1; done
    if kill -0 '$RUNNER' 2>/dev/null; then
        echo "cratelm: the launch script is gone: stopping the ranks (checkpoint, exit 75)" >&2; stop_ranks
    fi' </dev/null &
WATCHDOG=$!

STOPPED=""
on_signal() {
    echo "cratelm: got SIG$1: the ranks checkpoint at the end of this step and exit 75" >&2
    STOPPED="$1"
    stop_ranks
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP
while kill -0 "$RUNNER" 2>/dev/null; do
    wait "$RUNNER"                               # returns early when a trap ran
done
wait "$RUNNER"
RC=$?
kill -KILL "$WATCHDOG" 2>/dev/null
if [[ -n "$STOPPED" ]]; then
    echo "cratelm: the launcher exited with $RC after SIG$STOPPED" >&2
fi
exit "$RC"
