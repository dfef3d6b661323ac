#!/usr/bin/env bash
# docs/multitask.md's task and sampling studies: which tasks train together, and how an epoch shares them out.
#   scripts/tasks_study.sh MODEL_DIR DATA_DIR OUT_DIR [NAME ...]      # NAMEs: only those runs
# DATA_DIR: the folder scripts/make_study_data.py writes. Every run: 2 epochs, seeds 0, 1 and 2, the
# defaults otherwise; OUT_DIR/NAME/sSEED/summary.json each. scripts/tasks_table.py makes the tables.
set -euo pipefail
model=$1 data=$2 out=$3; shift 3
only=" $* "
run() {  # NAME FLAGS...
  local name=$1; shift
  [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0
  for seed in 0 1 2; do
    [ -f "$out/$name/s$seed/summary.json" ] && continue
    mkdir -p "$out/$name"
    python train.py --model "$model" --data "$data" --out "$out/$name/s$seed" --seed "$seed" --epochs 2 \
      --log-every 50 "$@" > "$out/$name/s$seed.log" 2>&1 || echo "$name seed $seed failed: see $out/$name/s$seed.log"
  done
}
# Which tasks: the seed's two, a third (CoNLL-2003's POS tags), and each alone.
run two --tasks ag,ner
run three --tasks ag,ner,pos
run ag --tasks ag
run ner --tasks ner
run pos --tasks pos
# NER and POS alone on as many sentences an epoch as the min rule gives them beside AG (1,425).
run ner_small --tasks ner --data "$data/conll_small"
run pos_small --tasks pos --data "$data/conll_small"
# How an epoch of the three is shared out (the same number of examples under every rule).
run proportional --tasks ag,ner,pos --sampling proportional
run temperature2 --tasks ag,ner,pos --sampling temperature:2
run annealed --tasks ag,ner,pos --sampling annealed
