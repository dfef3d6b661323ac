#!/usr/bin/env bash
# The pictures in docs/figures/, from the runs of the studies. Usage:
#   scripts/figures.sh EXPERIMENTS_OUT PAIRS_OUT
# EXPERIMENTS_OUT: scripts/experiments.sh MODEL DATA EXPERIMENTS_OUT freeze-none freeze-embeddings freeze-lower3 \
#                  freeze-backbone freeze-gradual lr-flat lr-decay0.7 lr-high lr-task-heads
# PAIRS_OUT:       REFERENCE=0 scripts/pairs_study.sh MODEL DATA PAIRS_OUT 0
# Needs matplotlib (requirements-dev.txt).
set -euo pipefail
exp=$1 pairs=$2
cd "$(dirname "$0")/.."
python scripts/plot_runs.py "$exp"/freeze-{none,embeddings,lower3,gradual,backbone} --view cost --x params,total_s --join \
  --labels none,embeddings,lower:3,gradual,backbone --out docs/figures/freezing.png \
  --title "Freezing: trainable parameters and run time against validation scores (1,500 examples per task, 2 epochs)"
python scripts/plot_runs.py "$exp"/freeze-none "$exp"/lr-{flat,decay0.7,high,task-heads} \
  --labels "lr 5e-5 decay 0.9,decay 1.0 (flat),decay 0.7,lr 1e-4,head rates 3e-4 / 3e-3" \
  --out docs/figures/learning-rates.png --title "Layer-wise rates: training loss and validation scores"
python scripts/plot_runs.py "$pairs"/{zero-shot-bi,bi-0,cross-0} --view cost --x train_s,search_s \
  --labels "untrained bi,bi-encoder,cross-encoder" --out docs/figures/pairs-cost.png \
  --title "STS-B dev Spearman against training time and against the time to search"
