#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU, or NPROC CPU processes on gloo.
#
#   launch_scripts/single_node_torchrun.sh [trainer flags...]
#   NPROC=8 launch_scripts/single_node_torchrun.sh --config configs/train/moc-paper-pretrain.yaml \
#       --data-path 1.0 data/corpus_text_document --tokenizer-type SentencePieceTokenizer \
#       --tokenizer-model tok.model --global-batch-size 256 --save runs/moc --load runs/moc
#
# Environment:
#   NPROC        processes (default: the GPUs present, else 2)
#   CONFIG       YAML passed as the first --config (default: configs/train/moc-tiny.yaml when the
#                flags name no --config; CONFIG= for none)
#   MASTER_PORT  default 29500;  PYTHON  the interpreter (default python)
# Flags go to python -m moc_megatron.train; later ones override the config.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NPROC="${NPROC:-$(gpus_or 2)}"
run_launcher "$PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$NPROC" \
    --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29500}" \
    -m moc_megatron.train "${CONFIG_ARGS[@]}" "$@"
