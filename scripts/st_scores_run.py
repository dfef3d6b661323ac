"""A pairs.py run scored by sentence-transformers itself, against the dev Spearman its summary.json holds.

    python scripts/st_scores_run.py RUN --data DATA [--tolerance 1e-4]

A bi-encoder run loads as SentenceTransformer(RUN) and is scored by that
library's EmbeddingSimilarityEvaluator (Spearman of the cosines); a
cross-encoder run loads as CrossEncoder(RUN), whose predict() gives the
scores (the sigmoid of the logit), ranked by scipy's spearmanr. DATA holds
stsb/sts-dev.csv, as for pairs.py. Prints one JSON object; exits 1 when the
two Spearman figures differ by more than --tolerance. Needs
sentence-transformers (requirements-dev.txt).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support.sentence_pairs import read_stsb  # noqa: E402


def st_spearman(run, dev):
    """sentence-transformers' dev Spearman of a pairs.py run folder (bi or cross, from its config.json)."""
    kind = json.loads((Path(run) / "config.json").read_text())["pairs"]["kind"]
    first, second, gold = ([pair[i] for pair in dev] for i in range(3))
    if kind == "bi":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
        model = SentenceTransformer(str(run), device="cpu")
        evaluator = EmbeddingSimilarityEvaluator(first, second, [score / 5 for score in gold], batch_size=32,
                                                 main_similarity="cosine", write_csv=False)
        return kind, float(evaluator(model)[f"{evaluator.primary_metric}"])
    from scipy.stats import spearmanr
    from sentence_transformers import CrossEncoder
    predicted = CrossEncoder(str(run), device="cpu").predict(list(zip(first, second)), batch_size=32)
    return kind, float(spearmanr(predicted, gold)[0])


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a pairs.py run with sentence-transformers.")
    p.add_argument("run", help="a run folder of pairs.py")
    p.add_argument("--data", default="data", help="data folder: reads stsb/sts-dev.csv")
    p.add_argument("--tolerance", type=float, default=1e-4, help="the largest difference that passes")
    args = p.parse_args(argv)
    dev = read_stsb(Path(args.data) / "stsb" / "sts-dev.csv")
    kind, theirs = st_spearman(args.run, dev)
    ours = json.loads((Path(args.run) / "summary.json").read_text())["dev"]["spearman"]
    result = {"run": args.run, "encoder": kind, "pairs": len(dev), "sentence_transformers_spearman": theirs,
              "summary_spearman": ours, "difference": theirs - ours}
    print(json.dumps(result))
    return 0 if abs(theirs - ours) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
