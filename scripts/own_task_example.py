"""docs/own-task.md's example: two tasks of one's own, written as files, with the JSON that describes them.

    python scripts/own_task_example.py FOLDER        # writes FOLDER/own.json and its four data files

mood_{train,test}.tsv: a sentence-level task. A header row, then four
tab-separated columns in an unusual order: the label ("calm" or "loud"),
an id, and the text in two parts. marks_{train,test}.txt: a word-level task
in CoNLL columns, "TAG ignored WORD": a word's tag is V when it starts with
a vowel, else C. Both are made up, learnable in a few steps; the test suite
trains on them (tests/test_tasks.py).
"""

import json
import sys
from pathlib import Path

import numpy as np

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def write_own_tasks(folder):
    """The four files of the module's docstring in folder, and folder/own.json; returns its path."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("test", 12)):
        rows = ["mood\tid\thead\ttail"]
        for i in range(n):
            loud = i % 2 == 0
            rows.append(f"{'loud' if loud else 'calm'}\t{i}\t{'shout' if loud else 'whisper'} {WORDS[i % 8]}\tnow")
        (folder / f"mood_{split}.tsv").write_text("\n".join(rows) + "\n")
        sentences = []
        for _ in range(n // 2):
            words = rng.choice(WORDS, size=5).tolist()
            sentences.append("\n".join(f"{'V' if w[0] in 'aeiou' else 'C'} x {w}" for w in words))
        (folder / f"marks_{split}.txt").write_text("\n\n".join(sentences) + "\n")
    tasks = [{"name": "mood", "level": "sentence", "format": "tsv", "text": [2, 3], "label": 0, "header": True,
              "files": {"train": "mood_train.tsv", "test": "mood_test.tsv"}},
             {"name": "marks", "level": "word", "text": 2, "label": 0, "output": "marks",
              "files": {"train": "marks_train.txt", "valid": "marks_test.txt", "test": "marks_test.txt"}}]
    (folder / "own.json").write_text(json.dumps(tasks, indent=1))
    return folder / "own.json"


if __name__ == "__main__":
    print(f"wrote {write_own_tasks(Path(sys.argv[1]))}")
