#!/usr/bin/env bash
# The runs behind docs/pairs.md: pairs.py and sentence-transformers' own training, side by side,
# one after the other on the same machine. Usage:
#   scripts/pairs_study.sh MODEL_DIR DATA_DIR OUT_DIR [SEEDS...]
#   ENCODERS=cross scripts/pairs_study.sh MODEL_DIR DATA_DIR OUT_DIR 3 4     # more seeds of one encoder
#   REFERENCE=0 scripts/pairs_study.sh MODEL_DIR DATA_DIR OUT_DIR               # pairs.py's runs only
# DATA_DIR holds stsb/sts-{train,dev}.csv. The reference needs `datasets` and `accelerate` besides
# sentence-transformers, which are not project dependencies: install them where you run this.
# scripts/pairs_table.py OUT_DIR turns the outputs into the tables of docs/pairs.md.
set -euo pipefail
model=$1 data=$2 out=$3; shift 3
seeds=("${@:-0}")
mkdir -p "$out"
ours() {  # NAME FLAGS...
  local name=$1; shift
  [ -f "$out/$name/summary.json" ] && return 0
  python pairs.py --model "$model" --data "$data" --out "$out/$name" --log-every 100 "$@" > "$out/$name.log" 2>&1
}
reference() {  # NAME FLAGS...
  local name=$1; shift
  [ "${REFERENCE:-1}" = 0 ] && return 0
  [ -f "$out/$name.json" ] && return 0
  python scripts/st_reference_pairs.py --model "$model" --data "$data/stsb" --out "$out/$name.json" "$@" \
    > "$out/$name.log" 2>&1
}
ours zero-shot-bi --encoder bi --epochs 0
for seed in "${seeds[@]}"; do
  for encoder in ${ENCODERS:-bi cross}; do
    ours "$encoder-$seed" --encoder "$encoder" --epochs 1 --batch-size 16 --seed "$seed"
    reference "st-$encoder-$seed" --encoder "$encoder" --epochs 1 --batch-size 16 --seed "$seed"
  done
done
