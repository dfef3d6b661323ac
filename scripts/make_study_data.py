"""The data folder of docs/multitask.md's task and sampling studies, cut from the full files, seeded.

    python scripts/make_study_data.py AG_NEWS_CSV CONLL_DIR OUT_DIR

AG News: 1,500 rows for train.csv and 2,000 other rows for test.csv, drawn
from AG_NEWS_CSV (train.py holds 5% of train out for validation). CoNLL-2003:
the first 4,000 sentences of CONLL_DIR/train.txt; CONLL_DIR/valid.txt split in
two at a document start: its first half is valid.txt, the rest test.txt.
The three tasks are then of unequal size (AG 1,425 training rows, CoNLL
4,000 sentences), so that the sampling rules differ. OUT_DIR/conll_small holds
the same CoNLL files with train cut to its first 1,425 sentences: NER or POS alone
on as many sentences an epoch as the default rule gives it beside AG.
"""

import sys
from pathlib import Path

import numpy as np


def sentences(text):
    """The blocks of a CoNLL file: "-DOCSTART-" lines and sentences, each with its blank line."""
    return [block + "\n\n" for block in text.strip("\n").split("\n\n")]


def main():
    ag, conll, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    rows = ag.read_text(encoding="utf-8").splitlines(keepends=True)  # one row per line in this file
    order = np.random.default_rng(0).permutation(len(rows))
    (out / "ag_news").mkdir(parents=True, exist_ok=True)
    (out / "ag_news" / "train.csv").write_text("".join(rows[i] for i in sorted(order[:1500])), encoding="utf-8")
    (out / "ag_news" / "test.csv").write_text("".join(rows[i] for i in sorted(order[1500:3500])), encoding="utf-8")
    (out / "conll2003").mkdir(parents=True, exist_ok=True)
    train = [b for b in sentences((conll / "train.txt").read_text(encoding="utf-8")) if not b.startswith("-DOCSTART-")]
    (out / "conll2003" / "train.txt").write_text("".join(train[:4000]), encoding="utf-8")
    valid = sentences((conll / "valid.txt").read_text(encoding="utf-8"))
    half = next(i for i in range(len(valid) // 2, len(valid)) if valid[i].startswith("-DOCSTART-"))
    (out / "conll2003" / "valid.txt").write_text("".join(valid[:half]), encoding="utf-8")
    (out / "conll2003" / "test.txt").write_text("".join(valid[half:]), encoding="utf-8")
    small = out / "conll_small" / "conll2003"
    small.mkdir(parents=True, exist_ok=True)
    (small / "train.txt").write_text("".join(train[:1425]), encoding="utf-8")
    for name in ("valid.txt", "test.txt"):
        (small / name).write_bytes((out / "conll2003" / name).read_bytes())
    print(f"wrote {out}: AG 1,500 train + 2,000 test rows; CoNLL 4,000 train sentences, valid.txt split at block {half}; conll_small: 1,425 train sentences")


if __name__ == "__main__":
    main()
