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
#   # OpenMPI: mpirun starts every rank (needs mpi4py; no --include/--exclude)
#   launch/deepspeed_multinode.sh launch/hostfile --launcher openmpi --master_addr node0 -- --config ...
#   # no ssh at all: run on EVERY node with its own rank (same hostfile everywhere)
#   launch/deepspeed_multinode.sh launch/hostfile --no_ssh --node_rank $NODE_RANK --master_addr node0 -- --config ...
#
# deepspeed flags that launch-check understands: --include --exclude --num_nodes --num_gpus
# --master_addr --master_port --launcher --launcher_args --no_ssh --node_rank --force_multi
# --ssh_port --venv_script (others: set SKIP_CHECK=1). Environment for the remote ranks:
# see docs/multinode.md (.deepspeed_env, NCCL_SOCKET_IFNAME, ...).
set -euo pipefail

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

if [[ "${SKIP_CHECK:-0}" != 1 ]]; then
    "$PYTHON" -m cratelm launch-check --hostfile "$HOSTFILE" "${DS_ARGS[@]}" "${TRAIN_ARGS[@]}" >&2
fi

# = `deepspeed --hostfile ...`; --module runs `python -u -m cratelm train ...` on every rank and
# --no_local_rank keeps --local_rank=K from landing before the subcommand (LOCAL_RANK is set).
exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${DS_ARGS[@]}" \
    --module --no_local_rank cratelm train "${TRAIN_ARGS[@]}"
