#!/usr/bin/env bash
# A tiny Ferret trained on CPU: launches recipes/tiny_cpu.yaml (about 1-2 minutes on 2 cores).
#
#   bash experiments/tiny_cpu_train.sh [OUT_DIR] [extra training flags...]      # STEPS=N changes the 40 steps
#
# It generates the toy shapes world (ferret/data/toy.py) and a 400-piece tokenizer into OUT_DIR/world, then runs
#   python -m ferret.train.train --config recipes/tiny_cpu.yaml  (its paths pointed at OUT_DIR)
# and prints the logged loss curve. Tensorboard logs: OUT_DIR/run/runs/; final model: OUT_DIR/run/final-checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
OUT=${1:-$(mktemp -d -t ferret-tiny-XXXX)}
shift || true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ ! -f "$OUT/world/tokenizer/tokenizer.json" ]]; then
  "$PYTHON" -m ferret.data.toy --out "$OUT/world" --num-train 400 --num-val 0 --num-test 0 --image-size 56 \
    --tokenizer --vocab-size 400
fi

"$PYTHON" -m ferret.train.train --config recipes/tiny_cpu.yaml \
  --tokenizer_path "$OUT/world/tokenizer" --data_path "$OUT/world/train.json" --image_folder "$OUT/world" \
  --output_dir "$OUT/run" ${STEPS:+--max_steps "$STEPS"} "$@"

"$PYTHON" - "$OUT/run/trainer_state.json" <<'PY'
import json, sys
history = json.load(open(sys.argv[1]))["log_history"]
print("step  loss    tokens/s")
for entry in history:
    if "loss" in entry:
        print(f"{entry['step']:4d}  {entry['loss']:.4f}  {entry.get('tokens_per_second', 0):.0f}")
PY
echo "outputs in $OUT"
