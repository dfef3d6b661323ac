"""Write tests/fixtures/seqeval_cases.json: entity scores from seqeval on perturbed CoNLL tag sequences.

Run by hand, where seqeval is installed and the real CoNLL-2003 valid file is at hand:

    pip install seqeval==1.2.2
    python scripts/make_seqeval_fixture.py DATA/conll2003/valid.txt

Each case is a small corpus: a few real gold tag sequences, and predictions
made from them by random edits (a tag replaced by any of the 9, an entity's
type changed, a B- turned into I-, a chunk cut short or run on), so that
every odd pattern conlleval has a rule for shows up. Only tags are stored.
"""

import json
import random
import sys
from pathlib import Path

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.readers import read_conll
from support.tasks import NER_TAGS, TASKS


def perturb(tags, rng):
    tags = list(tags)
    for _ in range(rng.randint(0, max(1, len(tags) // 3))):
        i = rng.randrange(len(tags))
        edit = rng.random()
        if edit < 0.4:
            tags[i] = rng.choice(NER_TAGS)
        elif edit < 0.6 and tags[i] != "O":
            tags[i] = tags[i][:2] + rng.choice(["PER", "ORG", "LOC", "MISC"])
        elif edit < 0.8 and tags[i].startswith("B-"):
            tags[i] = "I-" + tags[i][2:]
        elif i + 1 < len(tags):
            tags[i + 1] = "O" if tags[i + 1] != "O" else "I-" + (tags[i][2:] if tags[i] != "O" else "PER")
    return tags


def main(path, n_cases=240):
    rng = random.Random(0)
    sentences = [tags for _, tags in read_conll(path, TASKS["ner"]) if any(t != "O" for t in tags)]
    cases = []
    for _ in range(n_cases):
        gold = [rng.choice(sentences) for _ in range(rng.randint(1, 6))]
        pred = [perturb(tags, rng) for tags in gold]
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
        per_type = {k: {m: float(report[k][m]) for m in ("precision", "recall", "f1-score", "support")}
                    for k in ("PER", "ORG", "LOC", "MISC") if k in report}
        cases.append({"gold": [" ".join(t) for t in gold], "pred": [" ".join(t) for t in pred],
                      "precision": float(precision_score(gold, pred, zero_division=0)),
                      "recall": float(recall_score(gold, pred, zero_division=0)),
                      "f1": float(f1_score(gold, pred, zero_division=0)), "per_type": per_type})
    out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "seqeval_cases.json"
    out.write_text(json.dumps(cases, indent=0) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
