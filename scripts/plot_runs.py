"""Pictures of runs: training curves, or what each run cost against what it scored, several runs in one picture.

    python scripts/plot_runs.py runs/a runs/b --out curves.png                    # loss per step, scores per epoch
    python scripts/plot_runs.py runs/freeze-* --view cost --out cost.png          # trainable parameters, train time
    python scripts/plot_runs.py runs/bi runs/cross --view cost --x search_s --out search.png

A RUN is a folder that train.py or pairs.py wrote. curves reads metrics.jsonl:
the training loss of each task at every row of interval_losses (one per
--log-every steps), and each validation score at the end of each epoch. cost
reads summary.json and the best epoch's validation scores (the zero-shot run
of pairs.py, which has no epoch, its dev scores), and puts one point per run
against each --x:
  params     trainable parameters (log scale)
  train_s    seconds of training steps
  total_s    seconds of the whole run: reading the data, a frozen backbone's features, training, evaluation
  search_s   seconds to score --queries queries against --documents documents at
             the run's measured inference rate: a bi-encoder embeds each text once,
             a cross-encoder runs every (query, document) pair (docs/pairs.md)
matplotlib is needed here only (requirements-dev.txt); training never imports it.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

NAMES = {"ag_accuracy": "AG accuracy", "ner_f1": "entity F1", "spearman": "STS-B Spearman"}  # the rest: by key


def is_score(key):
    """A score a run records: each task's "<task>_accuracy" or "<task>_f1" (train.py), "spearman" (pairs.py)."""
    return key.endswith(("_accuracy", "_f1")) or key == "spearman"


def score_name(key):
    return NAMES.get(key, key.replace("_f1", " F1").replace("_", " "))
X_AXES = {"params": "trainable parameters", "train_s": "training time (s)", "total_s": "whole run (s)",
          "search_s": "time to search (s)"}


class RunError(Exception):
    """A run folder that cannot be drawn; the message names the file."""


def read_run(folder):
    """(metrics.jsonl records, summary.json or None) of a run folder."""
    folder = Path(folder)
    records, summary = [], None
    try:
        if (folder / "metrics.jsonl").exists():
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
        if (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{folder}: a file of the run cannot be read ({e})") from None
    if not records and summary is None:
        raise RunError(f"{folder}: neither metrics.jsonl nor summary.json; give folders that train.py or pairs.py wrote")
    return records, summary


STYLES = ("-", "--", ":", "-.")  # a run's tasks (and scores): one colour per run, one line style per task


def curves(runs, labels, plt):
    """Left: the training loss per logged step, a line per run and task; right: each score per epoch.
    Each run has a colour, each task (or score) a line style."""
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(12, 6))
    for n, ((records, _), label) in enumerate(zip(runs, labels)):
        colour = f"C{n % 10}"
        rows = [row for record in records for row in record.get("interval_losses", [])]
        if not rows:
            raise RunError(f"{label}: metrics.jsonl has no interval_losses (written by an older version); "
                           "train it again to draw its loss")
        tasks = [key for key in dict.fromkeys(k for row in rows for k in row) if key != "step"]  # a row holds
        for task, style in zip(tasks, itertools.cycle(STYLES)):  # the tasks its steps drew
            points = [(row["step"], row[task]) for row in rows if task in row]
            losses.plot(*zip(*points), color=colour, linestyle=style, label=f"{label} {task}", linewidth=1.2)
        present = [key for key in dict.fromkeys(k for r in records for k in r) if is_score(key)
                   and any(r.get(key) is not None for r in records)]
        for key, style in zip(present, itertools.cycle(STYLES)):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            scores.plot(*zip(*points), color=colour, linestyle=style, marker="o", label=f"{label} {score_name(key)}")
    losses.set(xlabel="step", ylabel="training loss (mean per log row)", title="training loss")
    scores.set(xlabel="step (end of each epoch)", ylabel="validation score", title="validation")
    for axes in (losses, scores):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: no line hidden
    return figure


def best_scores(records, summary, label):
    """The validation scores of the run's best epoch (summary.json's best_epoch), or the dev scores of a
    run with no epoch."""
    best = summary.get("best_epoch") if summary else None
    record = next((r for r in records if r.get("epoch") == best), None) or (summary or {}).get("dev") or {}
    found = {key: value for key, value in record.items() if is_score(key) and value is not None}
    if not found:
        raise RunError(f"{label}: no validation score to draw (metrics.jsonl, summary.json)")
    return found


def x_value(summary, x, label, queries, documents):
    """One run's cost on the axis x."""
    if summary is None:
        raise RunError(f"{label}: no summary.json (an unfinished run): its cost is not known yet")
    if x == "params":
        return summary["parameters"]["trainable"]
    if x in ("train_s", "total_s"):
        return summary["timings_s"][x.removesuffix("_s")]
    rate = summary.get("inference", {})
    if "sentences_per_s" in rate:  # a bi-encoder: each query and each document once
        return (queries + documents) / rate["sentences_per_s"]
    if "pairs_per_s" in rate:  # a cross-encoder: every pair
        return queries * documents / rate["pairs_per_s"]
    raise RunError(f"{label}: summary.json has no inference rate (only pairs.py's runs have one)")


def cost(runs, labels, plt, xs, queries, documents, join=False):
    """One panel per x: a point per run and score against the run's cost, each score a colour of its own,
    each point named by its run; join: each score's points joined in order of cost (a series of runs)."""
    figure, panels = plt.subplots(1, len(xs), figsize=(6 * len(xs), 4.5), squeeze=False)
    for x, axes in zip(xs, panels[0]):
        points = {}  # score -> [(cost, value, run label)]
        for (records, summary), label in zip(runs, labels):
            where = x_value(summary, x, label, queries, documents)
            for key, value in best_scores(records, summary, label).items():
                points.setdefault(key, []).append((where, value, label))
        for key, rows in points.items():
            rows.sort()
            axes.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", linestyle=":" if join else "",
                      label=score_name(key))
            for where, value, label in rows:
                axes.annotate(label, (where, value), fontsize=7, xytext=(4, 4), textcoords="offset points")
        title = X_AXES[x] + (f" ({queries:,} queries x {documents:,} documents)" if x == "search_s" else "")
        axes.set(xlabel=title, ylabel="validation score (best epoch)",
                 xscale="log" if x in ("params", "search_s") else "linear")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return figure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Draw runs of train.py or pairs.py into one PNG.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.jsonl and summary.json)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--view", choices=("curves", "cost"), default="curves",
                   help="curves: loss per step and scores per epoch; cost: one point per run against --x")
    p.add_argument("--x", default="params,train_s", help=f"cost: comma list of {', '.join(X_AXES)}")
    p.add_argument("--join", action="store_true", help="cost: join each score's points in order of cost, for "
                                                        "runs that form a series (more of one thing)")
    p.add_argument("--labels", default=None, help="comma list, one per run (default: the folders' names)")
    p.add_argument("--title", default=None, help="a title over the picture")
    p.add_argument("--queries", type=int, default=1000, help="search_s: the queries")
    p.add_argument("--documents", type=int, default=100_000, help="search_s: the documents each query is scored on")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(run).name for run in args.runs]
    xs = args.x.split(",")
    try:
        if len(labels) != len(args.runs):
            raise RunError(f"argument --labels: {len(labels)} labels for {len(args.runs)} runs")
        if bad := [x for x in xs if x not in X_AXES]:
            raise RunError(f"argument --x: {bad[0]} is not one of {', '.join(X_AXES)}")
        runs = [read_run(run) for run in args.runs]
        try:
            import matplotlib
        except ImportError:
            raise RunError("matplotlib is not installed: pip install -r requirements-dev.txt") from None
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
        if args.view == "curves":
            figure = curves(runs, labels, plt)
        else:
            figure = cost(runs, labels, plt, xs, args.queries, args.documents, args.join)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.title:
        figure.suptitle(args.title)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    tmp.replace(args.out)  # whole or not at all
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
