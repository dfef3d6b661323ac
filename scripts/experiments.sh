#!/usr/bin/env bash
# The training runs behind the README's Task 2-4 tables. Usage:
#   scripts/experiments.sh MODEL_DIR DATA_DIR OUT_DIR [NAME ...]    # NAMEs: only those runs
# Each run writes OUT_DIR/NAME/summary.json; scripts/results_table.py turns them into tables.
# The tables were measured with the defaults that train.py had before docs/defaults.md's study,
# so every run starts from those (a run's own flags come later and win).
set -euo pipefail
model=$1 data=$2 out=$3; shift 3
only=" $* "
before_study=(--lr 5e-5 --lr-decay 0.9 --loss-norm batch)
run() {  # NAME FLAGS...
  local name=$1; shift
  [ -f "$out/$name/summary.json" ] && return 0
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
  python train.py --model "$model" --data "$data" --out "$out/$name" --log-every 10 "${before_study[@]}" "$@" \
    > "$out/$name.log" 2>&1
}
mkdir -p "$out"
# Task 2: the full run, and the headline configuration.
run mean-full --pool mean --epochs 2
run max-backbone-full --pool max --freeze backbone --epochs 2
# Task 3 and Task 4: the same smaller budget for every variant (1,500 examples per task and split, 2 epochs).
small=(--limit 1500 --epochs 2 --pool mean)
run freeze-none "${small[@]}"
run freeze-embeddings "${small[@]}" --freeze embeddings
run freeze-lower3 "${small[@]}" --freeze lower:3
run freeze-backbone "${small[@]}" --freeze backbone
run freeze-gradual "${small[@]}" --unfreeze gradual
run lr-flat "${small[@]}" --lr-decay 1.0
run lr-decay0.7 "${small[@]}" --lr-decay 0.7
run lr-high "${small[@]}" --lr 1e-4
run lr-task-heads "${small[@]}" --cls-lr 3e-4 --ner-lr 3e-3
# Mixed precision on the CPU: bf16 autocast against fp32.
run amp-bf16-cpu "${small[@]}" --amp bf16
