"""Markdown tables from the summary.json and metrics.jsonl files of training runs.

    python scripts/results_table.py OUT_DIR [NAME ...]

One row per run: its flags that differ from the defaults, the best
validation scores, training speed, time and peak memory.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train import parse_args

DEFAULTS = {**vars(parse_args([])), "lr": 5e-5, "lr_decay": 0.9, "loss_norm": "batch"}  # experiments.sh's start
IGNORED = {"data", "model", "out", "log_every", "no_data_cache", "resume", "stop_after", "no_feature_store",
           "feature_store_limit_mb"}


def row(run):
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = records[summary["best_epoch"] - 1]
    changed = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in summary["config"].items()
                       if k not in IGNORED and v != DEFAULTS[k])
    speed = sum(r["samples_per_s"] for r in records) / len(records)
    return (f"| {run.name} | `{changed}` | {summary['parameters']['trainable']:,} | {best['ag_accuracy']:.4f} | "
            f"{best['ner_f1']:.4f} | {speed:.1f} | {summary['timings_s']['train'] / 60:.1f} | "
            f"{summary['peak_memory_mb']:,.0f} |")


def main():
    out = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(p.parent.name for p in out.glob("*/summary.json"))
    print("| run | flags | trainable params | AG valid acc | CoNLL valid F1 | train samples/s | train min | "
          "peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(row(out / name))


if __name__ == "__main__":
    main()
