"""Markdown tables of the runs of scripts/defaults_study.sh.

    python scripts/study_table.py OUT_DIR [NAME ...]

For each run name: the mean and standard deviation over seeds of the
validation scores at the epoch the run picked (the best mean of AG accuracy
and entity F1, as train.py and usual_job.py pick it) and at the last epoch,
and the mean wall time. --runs prints one row per run instead.
"""

import argparse
import json
import statistics
from pathlib import Path


def epochs_of(run):
    """([{"ag_accuracy", "ner_f1"} per epoch], best epoch, 1-based) of one run folder."""
    summary = json.loads((run / "summary.json").read_text())
    if "valid" in summary:  # scripts/usual_job.py
        return summary["valid"], summary["best_epoch"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records, summary["best_epoch"]


def runs_of(folder):
    """[(seed, {picked and last scores}, wall seconds)] of one NAME folder, by seed."""
    rows = []
    for run in sorted(folder.glob("s*/summary.json"), key=lambda p: int(p.parent.name[1:])):
        records, best = epochs_of(run.parent)
        wall = run.parent.with_suffix(".wall")
        rows.append((int(run.parent.name[1:]), {
            "f1": records[best - 1]["ner_f1"], "acc": records[best - 1]["ag_accuracy"],
            "last_f1": records[-1]["ner_f1"], "last_acc": records[-1]["ag_accuracy"], "best_epoch": best},
            float(wall.read_text()) if wall.exists() else float("nan")))
    return rows


def mean_sd(values):
    sd = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "one seed"
    return f"{statistics.mean(values):.4f} ({sd})"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("names", nargs="*")
    p.add_argument("--runs", action="store_true", help="one row per run")
    args = p.parse_intermixed_args()
    names = args.names or sorted(d.name for d in args.out.iterdir() if any(d.glob("s*/summary.json")))
    if args.runs:
        print("| run | seed | entity F1 | AG accuracy | epoch picked | last-epoch F1 | last-epoch accuracy | wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            for seed, s, wall in runs_of(args.out / name):
                print(f"| {name} | {seed} | {s['f1']:.4f} | {s['acc']:.4f} | {s['best_epoch']} | {s['last_f1']:.4f} | "
                      f"{s['last_acc']:.4f} | {wall:.0f} |")
        return
    print("| run | seeds | entity F1, mean (sd) | AG accuracy, mean (sd) | last epoch: F1 | last epoch: accuracy | "
          "wall s, mean |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rows = runs_of(args.out / name)
        if not rows:
            continue
        col = lambda key: [s[key] for _, s, _ in rows]  # noqa: E731
        print(f"| {name} | {len(rows)} | {mean_sd(col('f1'))} | {mean_sd(col('acc'))} | {mean_sd(col('last_f1'))} | "
              f"{mean_sd(col('last_acc'))} | {statistics.mean(w for _, _, w in rows):.0f} |")


if __name__ == "__main__":
    main()
