#!/usr/bin/env bash
# Ferret-13B: the paper's recipe, identical to experiments/ferret_7b_train.sh except for the base model
# (Vicuna-13B v1.3 + the LLaVA 336px 13B projector) and the output folder. Same variables and options:
#
#   bash experiments/ferret_13b_train.sh
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 bash experiments/ferret_13b_train.sh
#
# It runs:
#   deepspeed --num_gpus 8 --master_port 25001 --module ferret.train.train --deepspeed scripts/zero3.json \
#     --model_name_or_path ./model/vicuna-13b-v1-3 ... --output_dir ./checkpoints/ferret_13b
set -euo pipefail
export MODEL_VERSION=${MODEL_VERSION:-vicuna-13b-v1-3}
export OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/ferret_13b}
exec bash "$(dirname "$0")/ferret_7b_train.sh" "$@"
