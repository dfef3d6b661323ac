#!/usr/bin/env bash
# The runs behind docs/defaults.md's precision table: fp32 against bf16 autocast on the CPU, for the
# default job, the headline job (--pool max --freeze backbone) and pairs.py's two encoders (1 epoch),
# each over SEEDS (default "0 1 2"), one run at a time with all threads. Usage:
#   scripts/precision_study.sh MODEL_DIR SHARED_DATA OUT_DIR
# SHARED_DATA holds ag_news/train.csv, conll2003/{train,valid}.txt and stsb/sts-{train,dev}.csv.
# Finished runs are skipped, so the script can be stopped and rerun; scripts/study_table.py OUT_DIR
# prints the train.py rows, scripts/pairs_table.py-style lines are printed for the pairs runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=$(realpath "$1") shared=$(realpath "$2") out=$(realpath -m "$3")
seeds=${SEEDS:-0 1 2}
JOBS=1 THREADS=${THREADS:-$(nproc)} SEEDS=$seeds bash "$root/scripts/defaults_study.sh" "$model" "$shared" "$out" \
  defaults-fp32 defaults-bf16 frozen-max-fp32 frozen-max-bf16
mkdir -p "$out/data/stsb"
for f in sts-train.csv sts-dev.csv; do ln -sfn "$shared/stsb/$f" "$out/data/stsb/$f"; done
for seed in $seeds; do
  for encoder in bi cross; do
    for amp in off bf16; do
      name=pairs-$encoder-$amp/s$seed
      [ -f "$out/$name/summary.json" ] && continue
      rm -rf "${out:?}/$name" && mkdir -p "$out/pairs-$encoder-$amp"
      start=$(date +%s.%N)
      python "$root/pairs.py" --encoder "$encoder" --model "$model" --data "$out/data" --epochs 1 --batch-size 16 \
        --seed "$seed" --amp "$amp" --log-every 100 --out "$out/$name" > "$out/$name.log" 2>&1
      awk -v end="$(date +%s.%N)" -v start="$start" 'BEGIN { printf "%.1f\n", end - start }' > "$out/$name.wall"
      rm -f "$out/$name/model.safetensors" && rm -rf "$out/$name/checkpoint"
      echo "$name: $(cat "$out/$name.wall") s, dev Spearman $(python -c "import json,sys; print(json.load(open(sys.argv[1]))['dev']['spearman'])" "$out/$name/summary.json")"
    done
  done
done
