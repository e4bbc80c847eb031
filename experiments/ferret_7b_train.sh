#!/usr/bin/env bash
# Ferret-7B: launches the recipe recipes/ferret_7b.yaml (every training setting is there; the paper's recipe,
# docs/compatibility.md §9.2) on a DeepSpeed cluster.
#
#   bash experiments/ferret_7b_train.sh                                      # one node, 8 GPUs
#   NNODES=2 HOSTFILE=hostfile bash experiments/ferret_7b_train.sh           # several nodes from node 0 (pdsh/ssh)
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 bash experiments/ferret_7b_train.sh   # on every node, no ssh
#   DS_CONFIG=scripts/zero2.json bash experiments/ferret_7b_train.sh         # ZeRO-2 (more memory, less traffic)
#   bash experiments/ferret_7b_train.sh --output_dir elsewhere --gradient_accumulation_steps 2   # flags override
#
# It runs (one node):
#   deepspeed --num_gpus 8 --master_port 25001 --module ferret.train.train --deepspeed scripts/zero3.json \
#     --config recipes/ferret_7b.yaml [flags]
# On fewer GPUs keep the global batch of 128: e.g. 4 GPUs -> --gradient_accumulation_steps 2. A killed run restarts
# from the latest complete checkpoint-N of its output_dir when started again; the final model is
# OUTPUT_DIR/final-checkpoint. The original used FSDP through torchrun; that launch is at the end, commented out.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-recipes/ferret_7b.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-25001}
HOSTFILE=${HOSTFILE:-}            # "host slots=8" per line; set it to launch every node from this one over ssh
DS_CONFIG=${DS_CONFIG:-scripts/zero3.json}

launcher=(deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
if [[ -n "$HOSTFILE" ]]; then
  launcher+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR")
elif (( NNODES > 1 )); then
  launcher+=(--no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
fi
"${launcher[@]}" --module ferret.train.train --deepspeed "$DS_CONFIG" --config "$RECIPE" "$@"

# The original's launch (FSDP through torchrun), for comparison:
# torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
#   --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m ferret.train.train --config "$RECIPE" \
#   --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer "$@"
