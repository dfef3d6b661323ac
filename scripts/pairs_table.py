"""Markdown tables for docs/pairs.md from the outputs of scripts/pairs_study.sh.

    python scripts/pairs_table.py OUT_DIR

Quality (dev Spearman x100) and training time per seed, pairs.py next to
sentence-transformers; then each encoder's measured rate, and what scoring
N queries against M documents costs with each design at those rates.
"""

import json
import statistics
import sys
from pathlib import Path


def ours(run):
    summary = json.loads((run / "summary.json").read_text())
    return 100 * summary["dev"]["spearman"], summary["timings_s"]["train"], summary["inference"]


def reference(path):
    result = json.loads(path.read_text())
    return result["dev"]["spearman_x100"], result["train_seconds"]


def quality(out):
    lines = ["| encoder | seed | pairs.py Spearman | sentence-transformers Spearman | difference | "
             "pairs.py train s | sentence-transformers train s |", "|---|---|---|---|---|---|---|"]
    means = {}
    for encoder in ("bi", "cross"):
        rows = []
        for run in sorted(out.glob(f"{encoder}-*/summary.json")):
            seed = run.parent.name.split("-")[1]
            ref = out / f"st-{encoder}-{seed}.json"
            if ref.exists():
                rows.append((seed, *ours(run.parent)[:2], *reference(ref)))
        for seed, rho, seconds, ref_rho, ref_seconds in rows:
            lines.append(f"| {encoder} | {seed} | {rho:.2f} | {ref_rho:.2f} | {rho - ref_rho:+.2f} | "
                         f"{seconds:.0f} | {ref_seconds:.0f} |")
        if len(rows) > 1:
            mine, theirs = [r[1] for r in rows], [r[3] for r in rows]
            means[encoder] = statistics.mean(mine) - statistics.mean(theirs)
            lines.append(f"| {encoder} | mean (sd) | {statistics.mean(mine):.2f} ({statistics.stdev(mine):.2f}) | "
                         f"{statistics.mean(theirs):.2f} ({statistics.stdev(theirs):.2f}) | {means[encoder]:+.2f} | "
                         f"{statistics.mean(r[2] for r in rows):.0f} | {statistics.mean(r[4] for r in rows):.0f} |")
    return "\n".join(lines)


def cost(out, queries=1_000, documents=100_000, shortlist=100):
    """Seconds to score every query against every document: the bi-encoder embeds N + M sentences
    (the comparisons are one matrix product, negligible here); the cross-encoder runs N x M pairs;
    retrieve-then-rerank embeds N + M and reranks a shortlist of k documents per query."""
    bi = ours(out / "bi-0")[2]["sentences_per_s"]
    cross = ours(out / "cross-0")[2]["pairs_per_s"]
    rows = [("bi-encoder", (queries + documents) / bi),
            ("cross-encoder", queries * documents / cross),
            (f"bi-encoder top {shortlist}, cross-encoder rerank", (queries + documents) / bi + queries * shortlist / cross)]
    lines = [f"Rates: bi-encoder {bi:,.0f} sentences/s, cross-encoder {cross:,.0f} pairs/s.", "",
             f"| design | work for N = {queries:,} queries x M = {documents:,} documents | time |", "|---|---|---|"]
    work = [f"{queries + documents:,} sentences", f"{queries * documents:,} pairs",
            f"{queries + documents:,} sentences + {queries * shortlist:,} pairs"]
    for (name, seconds), what in zip(rows, work):
        lines.append(f"| {name} | {what} | {seconds / 3600:,.2f} h ({seconds:,.0f} s) |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python scripts/pairs_table.py OUT_DIR (the folder scripts/pairs_study.sh wrote)", file=sys.stderr)
        sys.exit(2)
    out = Path(sys.argv[1])
    missing = [name for name in ("zero-shot-bi", "bi-0", "cross-0") if not (out / name / "summary.json").is_file()]
    if missing:
        print(f"error: {out}: no finished run {missing[0]}/summary.json; run scripts/pairs_study.sh first",
              file=sys.stderr)
        sys.exit(2)
    zero = ours(out / "zero-shot-bi")[0]
    print(f"Zero-shot bi-encoder: dev Spearman {zero:.2f}\n")
    print(quality(out) + "\n")
    print(cost(out))
