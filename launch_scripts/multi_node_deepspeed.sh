#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher and a hostfile (lines "host slots=N").
#
#   HOSTFILE=hosts launch_scripts/multi_node_deepspeed.sh --config configs/train/moc-paper-pretrain.yaml \
#       --data-path ... --save runs/moc --load runs/moc
#   # no ssh (a scheduler starts one launcher per node), on node r:
#   NO_SSH=1 NODE_RANK=r HOSTFILE=hosts MASTER_ADDR=node0 launch_scripts/multi_node_deepspeed.sh ...
#
# With ssh, run it once on the first host: DeepSpeed starts the other nodes through pdsh, so every host
# needs passwordless ssh, this repository and its environment at the same path, and a shared
# filesystem for --save/--load. Variables to carry to the other nodes go in ./.deepspeed_env.
# Environment:
#   HOSTFILE     required;  MASTER_ADDR  default: the hostfile's first host;  MASTER_PORT  default 29500
#   NO_SSH, NODE_RANK  start this node's processes only
#   CONFIG       YAML passed as the first --config (default: configs/train/moc-tiny.yaml when the
#                flags name no --config; CONFIG= for none);  PYTHON  the interpreter (default python)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines: host slots=N)}"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
SSH_ARGS=()
if [[ -n "${NO_SSH:-}" ]]; then SSH_ARGS=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}"); fi
run_launcher "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" "${SSH_ARGS[@]}" --module moc_megatron.train "${CONFIG_ARGS[@]}" "$@"
