"""How much of the NER loss each sentence length gets, with random batches and with length grouping.

    python scripts/loss_weights.py DATA/conll2003/train.txt

Simulates one epoch of train.py's NER batches (5,320 sentences, batch 32,
--group-window 50 or 0) and, with --loss-norm batch (each batch's mean over its
labelled words), adds up each sentence's share of its batch's loss. Words
stand in for labelled word pieces (one label per word). docs/defaults.md
quotes the output.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.readers import read_conll  # noqa: E402
from support.tasks import TASKS  # noqa: E402

BATCH, WINDOW, EPOCH = 32, 50, 5320


def loss_shares(words, order):
    """Per sentence, its share of its batch's mean loss (its words / the batch's words)."""
    share = np.zeros(len(words))
    for start in range(0, len(order), BATCH):
        batch = order[start:start + BATCH]
        share[batch] = words[batch] / words[batch].sum()
    return share


def main():
    words = np.array([len(w) for w, _ in read_conll(sys.argv[1], TASKS["ner"])])
    drawn = np.random.default_rng(0).permutation(len(words))[:EPOCH]
    span = WINDOW * BATCH
    grouped = np.concatenate([w[np.argsort(words[w], kind="stable")]
                              for w in (drawn[i:i + span] for i in range(0, len(drawn), span))])
    plain, sorted_ = loss_shares(words, drawn), loss_shares(words, grouped)
    print("| words per sentence | share of sentences | share of words | share of the loss, random batches | "
          "share of the loss, grouped |")
    print("|---|---|---|---|---|")
    for low, high in ((1, 3), (4, 8), (9, 20), (21, 10**6)):
        picked = drawn[(words[drawn] >= low) & (words[drawn] <= high)]
        print(f"| {low}-{high if high < 10**6 else ''} | {len(picked) / len(drawn):.3f} | "
              f"{words[picked].sum() / words[drawn].sum():.3f} | {plain[picked].sum() / plain.sum():.3f} | "
              f"{sorted_[picked].sum() / sorted_.sum():.3f} |")


if __name__ == "__main__":
    main()
