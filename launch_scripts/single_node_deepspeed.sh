#!/usr/bin/env bash
# Train on one node with the deepspeed launcher: one process per GPU, or NPROC CPU processes on gloo.
#
#   launch_scripts/single_node_deepspeed.sh [trainer flags...]
#   NPROC=8 launch_scripts/single_node_deepspeed.sh --config configs/train/moc-paper-pretrain.yaml \
#       --deepspeed-config configs/deepspeed/zero2.json --data-path ... --save runs/moc --load runs/moc
#
# Environment:
#   NPROC        processes (default: the GPUs present, else 2)
#   CONFIG       YAML passed as the first --config (default: configs/train/moc-tiny.yaml when the
#                flags name no --config; CONFIG= for none)
#   MASTER_PORT  default 29500;  PYTHON  the interpreter (default python)
# The launcher appends --local_rank=N, which the trainer accepts (ranks come from the environment).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NPROC="${NPROC:-$(gpus_or 2)}"
run_launcher "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_addr 127.0.0.1 \
    --master_port "${MASTER_PORT:-29500}" --module moc_megatron.train "${CONFIG_ARGS[@]}" "$@"
