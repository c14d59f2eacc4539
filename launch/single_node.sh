#!/usr/bin/env bash
# One machine, N ranks, through the DeepSpeed launcher.
#
# Usage: launch/single_node.sh [--num_gpus N] --config FILES... [section.key=value ...] [--resume auto]
#
#   launch/single_node.sh --config configs/model/crate-gpt2-base.yaml configs/train/owt.yaml
#   launch/single_node.sh --num_gpus 4 --config ... train.micro_batch=8 --resume auto
#   NUM_GPUS=2 launch/single_node.sh --config configs/model/tiny.yaml configs/train/tiny-cpu.yaml  # 2 CPU ranks
#
# N defaults to the GPUs torch can see (CUDA_VISIBLE_DEVICES is respected); on a machine
# without a GPU to 1, or to $NUM_GPUS ranks on the CPU (gloo). Everything after the
# optional --num_gpus goes to `cratelm train` unchanged.
# Environment: NUM_GPUS, MASTER_PORT (default 29500), OMP_NUM_THREADS (default 1 for
# several CPU ranks: without it 2 ranks on 2 cores run ~6x slower), PYTHON (default python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # cratelm importable without `pip install -e .`
PYTHON="${PYTHON:-python}"

N="${NUM_GPUS:-}"
if [[ "${1:-}" == "--num_gpus" || "${1:-}" == "--num-gpus" || "${1:-}" == "-n" ]]; then
    N="$2"; shift 2
fi
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ -z "$N" ]]; then
    N=$(( GPUS > 0 ? GPUS : 1 ))
fi
if [[ "$GPUS" == 0 && "$N" -gt 1 ]]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

# --module: each rank runs `python -u -m cratelm train ...`.
# --no_local_rank: DeepSpeed would put --local_rank=K before the subcommand; the ranks read
# LOCAL_RANK from the environment instead.
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$N" --master_port "${MASTER_PORT:-29500}" \
    --module --no_local_rank cratelm train "$@"
