"""Evaluation metrics: accuracy, entity-level precision / recall / F1, and correlations for sentence pairs.

Entity scores follow conlleval, the CoNLL-2000/2003 shared-task script (and
seqeval's default mode, which reproduces it): an entity counts as found only
if its type and its exact span match a gold entity. Chunks are read from IOB2
tags the way conlleval reads them, so an I- tag after O or after another type
opens a new chunk instead of being an error.

Scores are built from counts (true positives, predicted, gold per type) so
that counts from several processes can be summed before dividing.

Sentence-pair scores (STS-B) are compared with the gold scores by Pearson's
and Spearman's correlation, Spearman's being Pearson's on the ranks, with
tied values given the average of their ranks (as scipy.stats.spearmanr).
"""

import numpy as np

def chunks(tags):
    """The entities in one tag sequence, as a set of (type, first index, last index)."""
    found = set()
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):  # the extra O closes a chunk at the end
        prefix, tag_kind = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        # A chunk ends at O, at a B-, or where the type changes.
        if start is not None and (prefix in ("O", "B") or tag_kind != kind):
            found.add((kind, start, i - 1))
            start = None
        # A chunk starts at B-, or at an I- that does not continue the current chunk.
        if prefix in ("B", "I") and start is None:
            start, kind = i, tag_kind
    return found


def entity_counts(gold, pred):
    """Per-type counts over a corpus: {type: [true positives, predicted, gold]}."""
    counts = {}
    for gold_tags, pred_tags in zip(gold, pred, strict=True):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"a sentence has {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        g, p = chunks(gold_tags), chunks(pred_tags)
        for kind, (tp, n_pred, n_gold) in _count_by_type(g, p).items():
            total = counts.setdefault(kind, [0, 0, 0])
            total[0] += tp
            total[1] += n_pred
            total[2] += n_gold
    return counts


def _count_by_type(gold_chunks, pred_chunks):
    kinds = {c[0] for c in gold_chunks | pred_chunks}
    return {k: (sum(1 for c in pred_chunks & gold_chunks if c[0] == k),
                sum(1 for c in pred_chunks if c[0] == k),
                sum(1 for c in gold_chunks if c[0] == k)) for k in kinds}


def prf(tp, n_pred, n_gold):
    """Precision, recall and F1 from counts; 0 where a denominator is 0."""
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def scores_from_counts(counts):
    """Micro-averaged precision/recall/F1 over all types, plus per-type scores."""
    tp, n_pred, n_gold = (sum(c[i] for c in counts.values()) for i in range(3))
    precision, recall, f1 = prf(tp, n_pred, n_gold)
    per_type = {}
    for kind in sorted(counts):
        p, r, f = prf(*counts[kind])
        per_type[kind] = {"precision": p, "recall": r, "f1": f, "support": counts[kind][2]}
    return {"precision": precision, "recall": recall, "f1": f1, "per_type": per_type}


def entity_f1(gold, pred):
    """Entity-level scores for lists of IOB2 tag sequences (one list per sentence)."""
    return scores_from_counts(entity_counts(gold, pred))


def ranks(x):
    """1-based ranks of the values of x; tied values share the average of the ranks they span."""
    values, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based position where each distinct value starts
    return (first + (counts + 1) / 2)[inverse]


def pearson(x, y):
    """Pearson's correlation; NaN when either side is constant (no correlation is defined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} values against {len(y)}")
    dx, dy = x - x.mean(), y - y.mean()
    norm = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / norm) if norm > 0 else float("nan")


def spearman(x, y):
    """Spearman's rank correlation: Pearson's on the ranks, ties averaged."""
    return pearson(ranks(x), ranks(y))


def accuracy(gold, pred):
    """Share of equal labels."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


# --- A task's scores by its metric (train.evaluate) -------------------------------------------

def task_counts(task, gold, predicted):
    """The counts a task's scores are made of, as a flat list of integers that ranks can sum: for
    entity_f1, (true positives, predicted, gold) per entity type of its labels; else (right, total).
    gold, predicted: per example, its label (sentence level) or its tags, one per word."""
    if task.metric == "entity_f1":
        found = entity_counts(gold, predicted)
        return [n for kind in entity_types(task) for n in found.get(kind, (0, 0, 0))]
    if task.level == "word":
        return [sum(g == p for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)), sum(map(len, gold))]
    return [sum(g == p for g, p in zip(gold, predicted)), len(gold)]


def entity_types(task):
    """The entity types an IOB2 tag set holds: "B-PER" -> "PER", sorted."""
    return sorted({label[2:] for label in task.labels if label[:2] in ("B-", "I-")})


def task_scores(task, counts):
    """task_counts (summed over ranks) -> {"<name>_accuracy"}, or {"<name>_f1", _precision, _recall,
    _per_type} for entity_f1."""
    if task.metric != "entity_f1":
        return {f"{task.name}_accuracy": counts[0] / counts[1] if counts[1] else 0.0}
    by_type = {kind: counts[3 * k:3 * k + 3] for k, kind in enumerate(entity_types(task)) if any(counts[3 * k:3 * k + 3])}
    scores = scores_from_counts(by_type)
    return {f"{task.name}_{key}": scores[key] for key in ("f1", "precision", "recall", "per_type")}


def main_score(metrics, name):
    """The score a task is judged by (the best epoch's, train.py): its entity F1, or its accuracy."""
    return metrics.get(f"{name}_f1", metrics.get(f"{name}_accuracy"))


def describe(metrics, names):
    """One line of every task's scores: "AG accuracy 0.9012 | NER F1 0.8123 (P 0.8011 R 0.8238)"."""
    return " | ".join(f"{n.upper()} F1 {metrics[n + '_f1']:.4f} (P {metrics[n + '_precision']:.4f} "
                      f"R {metrics[n + '_recall']:.4f})" if n + "_f1" in metrics else
                      f"{n.upper()} accuracy {metrics[n + '_accuracy']:.4f}" for n in names)
