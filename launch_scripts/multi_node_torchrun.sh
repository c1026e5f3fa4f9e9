#!/usr/bin/env bash
# Train on several nodes with torchrun and a c10d rendezvous. Run it on every node with the same
# NNODES, MASTER_ADDR (any one of the nodes), MASTER_PORT and RDZV_ID; node ranks are agreed there.
#
#   # on each of 2 nodes:
#   NNODES=2 MASTER_ADDR=node0 RDZV_ID=run1 launch_scripts/multi_node_torchrun.sh \
#       --config configs/train/moc-paper-pretrain.yaml --data-path ... --save runs/moc --load runs/moc
#
# Environment:
#   NNODES, MASTER_ADDR  required;  MASTER_PORT  default 29500;  RDZV_ID  default moc
#   NPROC_PER_NODE       default: the GPUs present, else 1
#   CONFIG       YAML passed as the first --config (default: configs/train/moc-tiny.yaml when the
#                flags name no --config; CONFIG= for none);  PYTHON  the interpreter (default python)
# --save/--load need a filesystem that every node sees.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR to one of the nodes}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(gpus_or 1)}"
run_launcher "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-moc}" \
    -m moc_megatron.train "${CONFIG_ARGS[@]}" "$@"
