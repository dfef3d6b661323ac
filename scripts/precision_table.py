"""The precision table of docs/defaults.md, from the runs of scripts/precision_study.sh.

    python scripts/precision_table.py OUT_DIR

For each job (the default job, the headline job, the bi- and cross-encoder): the validation scores
of fp32 and of bf16 autocast over the seeds, mean (sd), the difference of the means in units of
fp32's sd, and the mean wall times with their ratio. Then one row per run.
"""

import json
import statistics
import sys
from pathlib import Path

JOBS = {"the default job": ("defaults-fp32", "defaults-bf16"),
        "--pool max --freeze backbone": ("frozen-max-fp32", "frozen-max-bf16"),
        "pairs.py --encoder bi, 1 epoch": ("pairs-bi-off", "pairs-bi-bf16"),
        "pairs.py --encoder cross, 1 epoch": ("pairs-cross-off", "pairs-cross-bf16")}


def scores(run):
    """{metric: value} of one finished run: the valid scores of the epoch it picked, or dev Spearman."""
    summary = json.loads((run / "summary.json").read_text())
    if "encoder" in summary:
        return {"dev Spearman": summary["dev"]["spearman"]}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = records[summary["best_epoch"] - 1]
    return {"entity F1": best["ner_f1"], "AG accuracy": best["ag_accuracy"]}


def runs(folder):
    """[(seed, scores, wall seconds)] of one NAME folder."""
    found = sorted(folder.glob("s*/summary.json"), key=lambda p: int(p.parent.name[1:]))
    return [(int(p.parent.name[1:]), scores(p.parent), float(p.parent.with_suffix(".wall").read_text()))
            for p in found]


def mean_sd(values):
    return f"{statistics.mean(values):.4f} ({statistics.stdev(values):.4f})" if len(values) > 1 else \
        f"{values[0]:.4f} (one seed)"


def main():
    if len(sys.argv) != 2:
        print("usage: python scripts/precision_table.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    print("| job | score | seeds | fp32, mean (sd) | bf16, mean (sd) | bf16 - fp32, in fp32 sd | wall s, fp32 | "
          "wall s, bf16 | bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    every = []
    for job, (fp32, bf16) in JOBS.items():
        a, b = runs(out / fp32), runs(out / bf16)
        seeds = sorted({s for s, _, _ in a} & {s for s, _, _ in b})
        a, b = [r for r in a if r[0] in seeds], [r for r in b if r[0] in seeds]
        if not seeds:
            continue
        every += [(job, "fp32", r) for r in a] + [(job, "bf16", r) for r in b]
        wall_a, wall_b = statistics.mean(r[2] for r in a), statistics.mean(r[2] for r in b)
        for metric in a[0][1]:
            x, y = [r[1][metric] for r in a], [r[1][metric] for r in b]
            gap = statistics.mean(y) - statistics.mean(x)
            in_sd = f"{gap / statistics.stdev(x):+.2f}" if len(x) > 1 and statistics.stdev(x) > 0 else "n/a"
            print(f"| {job} | {metric} | {len(seeds)} | {mean_sd(x)} | {mean_sd(y)} | {in_sd} | "
                  f"{wall_a:.0f} | {wall_b:.0f} | "
                  f"{wall_b / wall_a:.3f} |")
    print()
    print("| job | precision | seed | scores | wall s |")
    print("|---|---|---|---|---|")
    for job, precision, (seed, values, wall) in every:
        shown = ", ".join(f"{metric} {value:.4f}" for metric, value in values.items())
        print(f"| {job} | {precision} | {seed} | {shown} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
