#!/usr/bin/env bash
# The runs behind docs/defaults.md: train.py's factors one at a time, its defaults, and the usual
# transformers job (scripts/usual_job.py), each over several seeds, on the valid splits. Usage:
#   scripts/defaults_study.sh MODEL_DIR SHARED_DATA OUT_DIR [NAME ...]
# SHARED_DATA holds ag_news/train.csv and conll2003/{train,valid}.txt. The script builds
# OUT_DIR/data from them: the files linked, plus stand-in test files (the first 200 AG rows and
# CoNLL valid sentences) because train.py reads a test split; the study reads valid scores only.
# Every NAME below runs once per seed in SEEDS (default "0 1 2"), JOBS at a time (default 2), each
# with THREADS threads (default nproc/JOBS); finished runs are skipped, so the script can be stopped
# and rerun.
# Each run leaves OUT_DIR/NAME/sSEED/ (summary.json, metrics.jsonl), its log and its wall time
# in seconds (sSEED.wall). scripts/study_table.py OUT_DIR prints the tables.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # the scripts run from the repository, wherever this is called from
model=$(realpath "$1") shared=$2 out=$(realpath -m "$3"); shift 3
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(usual old window0 window10 lossfixed flat lr1e-4 lr2e-4 heads5e-4 warmup0 ag10 defaults)
data=$out/data
mkdir -p "$data/ag_news" "$data/conll2003"
ln -sfn "$(realpath "$shared/ag_news/train.csv")" "$data/ag_news/train.csv"
ln -sfn "$(realpath "$shared/conll2003/train.txt")" "$data/conll2003/train.txt"
ln -sfn "$(realpath "$shared/conll2003/valid.txt")" "$data/conll2003/valid.txt"
# Written once, through a temporary name: another invocation's runs may be reading them.
[ -f "$data/ag_news/test.csv" ] || { head -n 200 "$shared/ag_news/train.csv" > "$data/ag_news/test.csv.tmp"
  mv "$data/ag_news/test.csv.tmp" "$data/ag_news/test.csv"; }
[ -f "$data/conll2003/test.txt" ] || { awk '/^$/ { n++ } n < 200' "$shared/conll2003/valid.txt" \
  > "$data/conll2003/test.txt.tmp"; mv "$data/conll2003/test.txt.tmp" "$data/conll2003/test.txt"; }

# The defaults before this study, spelled out so that the rows keep their meaning when the defaults change.
old="--lr 5e-5 --lr-decay 0.9 --head-lr 1e-3 --warmup 0.1 --group-window 50 --loss-norm batch"
flags() {  # NAME -> the command after `python`, without --model/--data/--out/--seed
  case $1 in
    defaults) echo "train.py" ;;
    defaults-fp32) echo "train.py --amp off" ;;  # docs/defaults.md, precision on the CPU
    fused-fp32) echo "train.py --amp off" ;;  # run from a tree whose lr.adamw is fused on the CPU too
    defaults-bf16) echo "train.py --amp bf16" ;;
    frozen-max-fp32) echo "train.py --pool max --freeze backbone --amp off" ;;
    frozen-max-bf16) echo "train.py --pool max --freeze backbone --amp bf16" ;;
    grouped-padded) echo "train.py --group-window 50 --unpad never" ;;  # the defaults before the unpadded path
    random-unpadded) echo "train.py --group-window 0 --unpad always" ;;  # the defaults since, on the CPU
    lr1e-4-window0) echo "train.py $old --lr 1e-4 --group-window 0" ;;
    lr1e-4-window10) echo "train.py $old --lr 1e-4 --group-window 10" ;;
    lr2e-4-window0) echo "train.py $old --lr 2e-4 --group-window 0" ;;
    old) echo "train.py $old" ;;
    window0) echo "train.py $old --group-window 0" ;;
    window10) echo "train.py $old --group-window 10" ;;
    flat) echo "train.py $old --lr-decay 1.0" ;;
    lr1e-4) echo "train.py $old --lr 1e-4" ;;
    lr2e-4) echo "train.py $old --lr 2e-4" ;;
    lr3e-4) echo "train.py $old --lr 3e-4" ;;
    heads5e-4) echo "train.py $old --head-lr 5e-4" ;;
    warmup0) echo "train.py $old --warmup 0" ;;
    ag10) echo "train.py $old --ag-valid-fraction 0.1" ;;
    lossfixed) echo "train.py $old --loss-norm fixed" ;;
    usual) echo "scripts/usual_job.py" ;;
    usual-our-rates) echo "scripts/usual_job.py --rates ours" ;;  # docs/defaults.md: run when ours meant --lr 1e-4
    frozen) echo "train.py --freeze backbone" ;;
    frozen-max) echo "train.py --pool max --freeze backbone" ;;
    frozen-max-heads5e-4) echo "train.py --pool max --freeze backbone --head-lr 5e-4" ;;
    frozen-max-heads3e-3) echo "train.py --pool max --freeze backbone --head-lr 3e-3" ;;
    frozen-max-heads1e-2) echo "train.py --pool max --freeze backbone --head-lr 1e-2" ;;
    frozen-heads1e-2) echo "train.py --freeze backbone --head-lr 1e-2" ;;
    usual-frozen) echo "scripts/usual_job.py --freeze backbone" ;;
    usual-frozen-max) echo "scripts/usual_job.py --pool max --freeze backbone" ;;
    usual-frozen-max-our-rates) echo "scripts/usual_job.py --pool max --freeze backbone --rates ours" ;;
    *) echo "unknown study run: $1" >&2; return 2 ;;
  esac
}
for name in "${names[@]}"; do flags "$name" > /dev/null; done  # fail before starting anything

one() {  # NAME SEED
  local name=$1 seed=$2 dir=$out/$1 start
  [ -f "$dir/s$seed/summary.json" ] && return 0
  rm -rf "$dir/s$seed"  # a run stopped part-way starts again from nothing, so that its wall time is whole
  mkdir -p "$dir"
  start=$(date +%s.%N)
  # shellcheck disable=SC2046
  python "$root"/$(flags "$name") --model "$model" --data "$data" --epochs 2 --seed "$seed" --out "$dir/s$seed" \
    > "$dir/s$seed.log" 2>&1 || { echo "$name seed $seed failed: see $dir/s$seed.log" >&2; return 1; }
  awk -v end="$(date +%s.%N)" -v start="$start" 'BEGIN { printf "%.1f\n", end - start }' > "$dir/s$seed.wall"
  rm -rf "$dir/s$seed/checkpoint" "$dir/s$seed/model.safetensors"  # the study keeps scores, not weights
  echo "$name seed $seed: $(cat "$dir/s$seed.wall") s"
}
export -f one flags
export model data out old root
jobs=${JOBS:-2}
[ "$jobs" -ge 1 ] || { echo "JOBS must be at least 1, got $jobs" >&2; exit 2; }
export OMP_NUM_THREADS=${THREADS:-$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 ))}
for name in "${names[@]}"; do for seed in ${SEEDS:-0 1 2}; do echo "$name $seed"; done; done |
  xargs -P "$jobs" -L 1 bash -c 'one "$@"' _
