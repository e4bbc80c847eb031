#!/usr/bin/env bash
# A tiny Ferret trained on CPU through the same entry point as the 7B/13B recipes (about 1-2 minutes on 2 cores).
#
#   bash experiments/tiny_cpu_train.sh [OUT_DIR] [extra train.py flags...]
#
# It generates the toy shapes world (ferret/data/toy.py) and a 400-piece tokenizer into OUT_DIR/world, then runs:
#   python -m ferret.train.train --init_config small --tokenizer_path OUT_DIR/world/tokenizer \
#     --data_path OUT_DIR/world/train.json --image_folder OUT_DIR/world --dataset_type toy \
#     --output_dir OUT_DIR/run --max_steps 40 --per_device_train_batch_size 8 --learning_rate 2e-3 ... --use_cpu True
# and prints the logged loss curve. Tensorboard logs: OUT_DIR/run/runs/; final model: OUT_DIR/run/final-checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
OUT=${1:-$(mktemp -d -t ferret-tiny-XXXX)}
shift || true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-40}

if [[ ! -f "$OUT/world/tokenizer/tokenizer.json" ]]; then
  "$PYTHON" -m ferret.data.toy --out "$OUT/world" --num-train 400 --num-val 0 --num-test 0 --image-size 56 \
    --tokenizer --vocab-size 400
fi

"$PYTHON" -m ferret.train.train \
  --init_config small --tokenizer_path "$OUT/world/tokenizer" \
  --data_path "$OUT/world/train.json" --image_folder "$OUT/world" --dataset_type toy \
  --output_dir "$OUT/run" --resume_from_checkpoint no \
  --max_steps "$STEPS" --per_device_train_batch_size 8 --learning_rate 2e-3 --warmup_ratio 0.05 \
  --lr_scheduler_type cosine --weight_decay 0 --logging_steps 1 --save_steps 20 --save_total_limit 2 \
  --model_max_length 256 --use_cpu True --seed 0 --report_to tensorboard "$@"

"$PYTHON" - "$OUT/run/trainer_state.json" <<'PY'
import json, sys
history = json.load(open(sys.argv[1]))["log_history"]
print("step  loss    tokens/s")
for entry in history:
    if "loss" in entry:
        print(f"{entry['step']:4d}  {entry['loss']:.4f}  {entry.get('tokens_per_second', 0):.0f}")
PY
echo "outputs in $OUT"
