"""Markdown tables of scripts/tasks_study.sh's runs: each task's test score, mean ± standard deviation over seeds.

    python scripts/tasks_table.py OUT_DIR [NAME ...]

A row per run NAME (default: every folder of OUT_DIR), a column per score
any of them holds (each task's accuracy or entity F1, from summary.json: the
test split, scored with the epoch that validation picked), and the mean
wall time of a run.
"""

import json
import statistics
import sys
from pathlib import Path


def score_keys(summary):
    return [k for k in summary if k.endswith(("_accuracy", "_f1"))]


def main():
    out = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(p.name for p in out.iterdir() if p.is_dir())
    runs = {name: [json.loads(p.read_text()) for p in sorted((out / name).glob("s*/summary.json"))] for name in names}
    keys = list(dict.fromkeys(k for summaries in runs.values() for s in summaries for k in score_keys(s)))
    print("| run | seeds | " + " | ".join(keys) + " | wall time |")
    print("|---|---|" + "---|" * len(keys) + "---|")
    for name, summaries in runs.items():
        cells = []
        for key in keys:
            values = [s[key] for s in summaries if key in s]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {sd:.4f}" if values else "")
        wall = statistics.mean(s["timings_s"]["total"] for s in summaries) if summaries else 0
        print(f"| {name} | {len(summaries)} | " + " | ".join(cells) + f" | {wall:.0f} s |")


if __name__ == "__main__":
    main()
