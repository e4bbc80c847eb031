#!/usr/bin/env bash
# Ferret-7B: the paper's training recipe (docs/compatibility.md §9.2) on 8x A100-80GB, with DeepSpeed ZeRO-3.
#
#   bash experiments/ferret_7b_train.sh                      # one node, 8 GPUs
#   NNODES=2 HOSTFILE=hostfile bash experiments/ferret_7b_train.sh       # several nodes from node 0 (pdsh/ssh)
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 bash experiments/ferret_7b_train.sh   # on every node, no ssh
#   DS_CONFIG=scripts/zero2.json bash experiments/ferret_7b_train.sh     # ZeRO-2 (more memory, less traffic)
#
# It runs (one node):
#   deepspeed --num_gpus 8 --master_port 25001 --module ferret.train.train --deepspeed scripts/zero3.json \
#     --model_name_or_path ./model/vicuna-7b-v1-3 --vision_tower openai/clip-vit-large-patch14-336 \
#     --pretrain_mm_mlp_adapter ./model/llava-336px-pretrain-vicuna-7b-v1-3/mm_projector.bin ... (below)
#
# Global batch 128 = 16 per GPU x 8 GPUs x 1 accumulation step; 3 epochs, lr 2e-5 cosine, warm-up 3 %, bf16 + tf32.
# On fewer GPUs keep the global batch: e.g. 4 GPUs -> GRAD_ACCUM=2. A killed run restarts from the latest complete
# checkpoint-N in OUTPUT_DIR when started again. The final model is OUTPUT_DIR/final-checkpoint.
# The original used FSDP instead of DeepSpeed; that launch is kept, commented out, at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---------------------------------------------------------------- model and output
MODEL_VERSION=${MODEL_VERSION:-vicuna-7b-v1-3}
MODEL_PATH=${MODEL_PATH:-./model/$MODEL_VERSION}
PROJECTOR=${PROJECTOR:-./model/llava-336px-pretrain-$MODEL_VERSION/mm_projector.bin}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}   # or a local CLIP folder
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/ferret_7b}

# ---------------------------------------------------------------- the GRIT mix (paths of the original recipe)
data_path=(
  dataset/git_instruction.json
  dataset/vg_objects.json
  dataset/vg_relations.json
  dataset/vg_regions.json
  dataset/grounded_llava_boxes_detail.json
  dataset/grounded_llava_boxes_complex_reasoning.json
  dataset/grounded_llava_boxes_conversation.json
  dataset/refexp_all.json
  dataset/flickr.json
  dataset/objects365.json
)
image_folder=(
  dataset/coco2014/train2014
  dataset/vg/images
  dataset/vg/images
  dataset/vg/images
  dataset/coco2014/train2014
  dataset/coco2014/train2014
  dataset/coco2014/train2014
  data/refcoco/train2014
  data/flickr30k/flickr30k_images_split/train
  data/objects365_v1/train
)
data_multiple=(3 1 0.2 0.2 1 1 1 1 1 1)

# ---------------------------------------------------------------- cluster
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-25001}
HOSTFILE=${HOSTFILE:-}            # "host slots=8" per line; set it to launch every node from this one over ssh
DS_CONFIG=${DS_CONFIG:-scripts/zero3.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-16}
GRAD_ACCUM=${GRAD_ACCUM:-1}
NUM_WORKERS=${NUM_WORKERS:-8}

launcher=(deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
if [[ -n "$HOSTFILE" ]]; then
  launcher+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR")
elif (( NNODES > 1 )); then
  launcher+=(--no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
fi

args=(
  --model_name_or_path "$MODEL_PATH"
  --version v1
  --vision_tower "$VISION_TOWER"
  --pretrain_mm_mlp_adapter "$PROJECTOR"
  --mm_vision_select_layer -2
  --mm_use_im_start_end False
  --mm_use_im_patch_token False
  --data_path "${data_path[@]}"
  --image_folder "${image_folder[@]}"
  --data_multiple "${data_multiple[@]}"
  --point_input_sample 'segment_mask|center'
  --add_region_feature True
  --region_geo_sampler True
  --sampler_pooler_mode max
  --refer_previous_point False
  --region_feature_axes xy
  --resized_image_h 336
  --resized_image_w 336
  --image_aspect_ratio square_nocrop
  --lora_enable False
  --bf16 True
  --tf32 True
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs 3
  --per_device_train_batch_size "$PER_DEVICE_BATCH"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --eval_strategy no
  --save_strategy steps
  --save_steps 1500
  --save_total_limit 3
  --learning_rate 2e-5
  --weight_decay 0.
  --warmup_ratio 0.03
  --lr_scheduler_type cosine
  --logging_steps 1
  --model_max_length 2048
  --gradient_checkpointing True
  --dataloader_num_workers "$NUM_WORKERS"
  --report_to tensorboard
  --save_vision_tower True
  --seed 42
)

mkdir -p "$OUTPUT_DIR"
"${launcher[@]}" --module ferret.train.train --deepspeed "$DS_CONFIG" "${args[@]}" "$@"

# The original's launch (FSDP through torchrun), for comparison:
# torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
#   --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m ferret.train.train \
#   --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer "${args[@]}" "$@"
