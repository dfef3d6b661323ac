#!/usr/bin/env bash
# Everything this codebase checks on a CUDA GPU, in one go. Usage:
#   scripts/gpu_check.sh MODEL_DIR DATA_DIR OUT_DIR
# MODEL_DIR: all-MiniLM-L6-v2 (its weights may be rounded to fp16 for the transfer; train.py reads
# them into fp32). DATA_DIR: train.py's layout (download.py writes one; scripts/defaults_study.sh
# builds one from train and valid files). OUT_DIR gets one folder per training run and the bench
# results as JSON. The steps, each under its own time limit, so that one that hangs leaves the rest:
#   1. scripts/cuda_check.py: parity with transformers, and pooling in fp32/fp16/bf16;
#   2. bench.py at bert-base shape against transformers, eager: B=32 S=64 in bf16, and B=256 S=128
#      in fp32 and bf16 with and without the backbone frozen (MFU against a bf16 matrix product of
#      the same run); each with a profile of its top kernels;
#   3. one epoch of train.py on MiniLM in fp16 (GradScaler), bf16 and fp32;
#   4. torchrun with one process (NCCL): one epoch, stop, resume, finish;
#   5. the headline flags, --pool max --freeze backbone: the feature build and the steps;
#   6. one epoch in bf16 with cuDNN's attention kernels switched back on, as it is and with every
#      batch padded to a multiple of 8 tokens;
#   7. compiled: bench.py at both shapes with our model compiled (transformers' eager), and one
#      epoch of train.py --compile in bf16 (the compiled path with padding masks).
# Then a table of the training runs. Exit status: the number of steps that failed.
# STEPS="name ..." runs only the steps named (see the === lines); TRAIN_FLAGS are added to every
# train.py run (e.g. "--limit 200" for a quick try); PYTHON is the interpreter (default python3);
# DEADLINE_S skips every step whose time limit would end past that many seconds from the start, so
# that the script ends by itself within a time budget (a `timeout` around it would stop the script but
# not the step it is running).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=$(realpath "$1") data=$(realpath "$2") out=$(realpath -m "$3")
mkdir -p "$out"
cd "$root"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
read -r -a extra <<< "${TRAIN_FLAGS:-}"
failed=0
step() {  # LIMIT_S NAME COMMAND...: run it, report its wall time and exit status
  local limit=$1 name=$2 start rc; shift 2
  [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $name "* ]] || return 0
  if [ -n "${DEADLINE_S:-}" ] && [ $((SECONDS + limit)) -gt "$DEADLINE_S" ]; then
    echo; echo "=== $name: skipped, its limit of $limit s would end past DEADLINE_S ($SECONDS s gone)"
    failed=$((failed + 1)); return 0
  fi
  echo; echo "=== $name: $*"
  start=$(date +%s.%N)
  timeout "$limit" "$@"; rc=$?
  echo "=== $name: rc $rc, $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
$py -c "import torch, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
  'CUDA', torch.version.cuda, 'transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true

step 90 cuda_check $py scripts/cuda_check.py
bench=($py bench.py --config bert-base --vs-transformers)
step 90 bench-b32-eager "${bench[@]}" --precision bf16 --batch-size 32 --seq-len 64 --steps 20 --profile 5 \
  --json "$out/bench-b32-eager.json"
step 120 bench-b256-eager "${bench[@]}" --precision fp32 bf16 --freeze none backbone --batch-size 256 --seq-len 128 \
  --steps 10 --profile 3 --json "$out/bench-b256-eager.json"
train=($py train.py --model "$model" --data "$data" --epochs 1 --log-every 100 "${extra[@]}")
for amp in fp16 bf16 off; do
  step 90 "train-$amp" "${train[@]}" --amp "$amp" --out "$out/train-$amp"
done
tr=($py -m torch.distributed.run --standalone --nproc_per_node=1 train.py --model "$model" --data "$data" --epochs 2
    --limit 2000 --log-every 20 "${extra[@]}" --out "$out/torchrun")
step 90 torchrun-stop "${tr[@]}" --stop-after 1
step 90 torchrun-resume "${tr[@]}" --resume
step 90 headline "${train[@]}" --pool max --freeze backbone --out "$out/headline"
# bf16 with cuDNN's attention switched back on (runtime.pick_device switches it off on CUDA: it plans
# every new batch shape again, and length-grouped batches come in many shapes), as it is, and with every
# batch padded to a multiple of 8 tokens (8 times fewer shapes). Compare their times with train-bf16's.
variant='import sys, torch, distributed, train
pick = distributed.pick_device
def with_cudnn(name):
    device = pick(name)
    torch.backends.cuda.enable_cudnn_sdp(True)
    return device
distributed.pick_device = with_cudnn
if sys.argv[1] == "pad8":  # the padding of every batch, training and evaluation (train.Setup.batching)
    from data import Batching
    train.Setup.batching = property(lambda s: Batching(2 * s.args.batch_size, s.model.bert.config.pad_token_id, 8))
sys.exit(train.main(sys.argv[3:]))'
step 90 train-bf16-cudnn-attention $py -c "$variant" as-is "${train[@]:1}" --amp bf16 \
  --out "$out/train-bf16-cudnn-attention"
step 90 train-bf16-cudnn-attention-pad8 $py -c "$variant" pad8 "${train[@]:1}" --amp bf16 \
  --out "$out/train-bf16-cudnn-attention-pad8"
# The compiled steps last: compiling takes the longest, and its time is the least certain.
step 150 bench-b32-compiled "${bench[@]}" --precision bf16 --batch-size 32 --seq-len 64 --steps 20 --compile ours \
  --profile 5 --json "$out/bench-b32-compiled.json"
step 240 train-bf16-compiled "${train[@]}" --amp bf16 --compile --out "$out/train-bf16-compiled"
step 150 bench-b256-compiled "${bench[@]}" --precision bf16 --batch-size 256 --seq-len 128 --steps 10 --compile ours \
  --profile 3 --json "$out/bench-b256-compiled.json"
rm -rf "$out"/*/model.safetensors "$out"/*/checkpoint  # scores and logs come back, not weights

echo; echo "=== training runs: validation scores of the epoch kept, times, memory"
$py - "$out" <<'EOF'
import json, sys
from pathlib import Path
print("| run | precision | AG accuracy | entity F1 | train s | total s | peak MB | skipped steps | features s |")
print("|---|---|---|---|---|---|---|---|---|")
for run in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(run.read_text())
    valid = [json.loads(line) for line in (run.parent / "metrics.jsonl").read_text().splitlines()][s["best_epoch"] - 1]
    t = s["timings_s"]
    print(f"| {run.parent.name} | {s['precision']} | {valid['ag_accuracy']:.4f} | {valid['ner_f1']:.4f} | {t['train']} "
          f"| {t['total']} | {s['peak_memory_mb']:,.0f} | {s['skipped_steps']} | "
          f"{(s.get('feature_store') or {}).get('seconds', '')} |")
EOF
echo "=== $failed steps failed"
exit "$failed"
