#!/usr/bin/env bash
# Several machines with torchrun: run this script once on EVERY node.
#
# Usage: [env] launch/torchrun_multinode.sh --config FILES... [section.key=value ...] [--resume auto]
#
#   # static master (every node knows its rank; node 0's address is the master)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multinode.sh --config ... --resume auto
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multinode.sh --config ... --resume auto
#   # c10d rendezvous (no node ranks; any node can host it; RDZV_ID must be unique per job)
#   RDZV=c10d NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29400 RDZV_ID=job42 launch/torchrun_multinode.sh --config ...
#
# Environment: NNODES (required), NODE_RANK (static: required), MASTER_ADDR (required),
# MASTER_PORT (default 29500), NPROC_PER_NODE (default: the GPUs torch sees, else 1),
# RDZV=static|c10d (default static), RDZV_ID (default cratelm), SKIP_CHECK=1 (skip
# `cratelm launch-check`), TORCH_ELASTIC_SHUTDOWN_TIMEOUT (seconds torchrun waits for
# the ranks to checkpoint after SIGTERM before it kills them; default here 100), PYTHON.
# Network variables (NCCL_SOCKET_IFNAME, ...) are read from this node's environment: see
# docs/multinode.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

: "${NNODES:?set NNODES, the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0 (or of the c10d rendezvous host)}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV="${RDZV:-static}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"

if [[ "$RDZV" == c10d ]]; then
    RDZV_ARGS=(--rdzv_backend=c10d "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT" "--rdzv_id=${RDZV_ID:-cratelm}")
    CHECK_ARGS=(--rdzv-backend c10d --rdzv-id "${RDZV_ID:-cratelm}")
else
    : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1), or use RDZV=c10d}"
    RDZV_ARGS=("--node_rank=$NODE_RANK" "--master_addr=$MASTER_ADDR" "--master_port=$MASTER_PORT")
    CHECK_ARGS=(--node_rank "$NODE_RANK")
fi

if [[ "${SKIP_CHECK:-0}" != 1 ]]; then
    # the batch divides over NNODES x NPROC_PER_NODE ranks; the master port is free (node 0)
    # or reachable (other nodes)
    "$PYTHON" -m cratelm launch-check --launcher torchrun --num_nodes "$NNODES" --num_gpus "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${CHECK_ARGS[@]}" "$@" >&2
fi

exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    "${RDZV_ARGS[@]}" -m cratelm train "$@"
