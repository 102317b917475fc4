#!/usr/bin/env bash
# Multi-GPU and multi-node pretraining: torchrun starts one process per GPU on each node
# (NCCL between GPUs; Gloo when the config says device: cpu).
#
#   one node, 4 GPUs:   bash examples/multi_gpu/launch.sh
#   two nodes, 4 GPUs each, run on every node with its own rank:
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example.org bash examples/multi_gpu/launch.sh
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example.org bash examples/multi_gpu/launch.sh
#   under SLURM (one task per node):
#       NNODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID \
#       MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) \
#       bash examples/multi_gpu/launch.sh
#
# Settings from the environment: CONFIG (default: pretrain.yaml beside this script),
# NPROC_PER_NODE (4), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
# Arguments after the script go to `drasclr train`. DRY_RUN=1 prints the command instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command=(
    torchrun
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}"
    --nproc_per_node="${NPROC_PER_NODE:-4}"
    -m drasclr.cli train --config "${CONFIG:-$here/pretrain.yaml}" "$@"
)
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${command[@]}"
    echo
else
    exec "${command[@]}"
fi
