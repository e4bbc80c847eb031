#!/usr/bin/env bash
# Ferret-13B: launches recipes/ferret_13b.yaml exactly as experiments/ferret_7b_train.sh launches the 7B recipe
# (same variables and options):
#
#   bash experiments/ferret_13b_train.sh
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 bash experiments/ferret_13b_train.sh
#
# It runs:
#   deepspeed --num_gpus 8 --master_port 25001 --module ferret.train.train --deepspeed scripts/zero3.json \
#     --config recipes/ferret_13b.yaml [flags]
set -euo pipefail
export RECIPE=${RECIPE:-recipes/ferret_13b.yaml}
exec bash "$(dirname "$0")/ferret_7b_train.sh" "$@"
