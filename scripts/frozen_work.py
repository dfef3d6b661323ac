"""How much a frozen-backbone run puts through the encoder: every row, or only the rows it reads.

    python scripts/frozen_work.py --data DIR --model DIR [--epochs 3] [--batch-size 32] [--seed 0] [--max-len 128]
                                  [--time N]

Prints examples and word pieces for two designs of `train.py --freeze backbone`:
  all rows   the encoder over every training row once, then every validation
             pass (one per epoch) and the test pass through the whole model
  read rows  the encoder once over the training rows the epochs draw, and once
             over each validation and test row (features.py); the passes then
             run only the heads
Word pieces are what the encoder's cost follows; docs/freezing.md scales them
to bert-base on a CPU and a GPU. --time N encodes the N longest-first AG
training rows (a mix of lengths: every k-th row) with --model and with a
bert-base-shaped model of random weights, and prints word pieces per second
of each, the ratio that scaling needs.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import MultiTaskSampler, length_batches, load_splits, load_tokenizer, pad  # noqa: E402
from model import Bert, BertConfig, MultiTaskModel, SentenceEncoder  # noqa: E402
from support.model_folder import load_pretrained  # noqa: E402


@torch.no_grad()
def pieces_per_second(bert, rows, batch_size=64):
    """Encode rows (token id lists) as features.py does, in eval mode, longest first; word pieces per second."""
    model = MultiTaskModel(SentenceEncoder(bert, pool="max")).eval()
    start = time.perf_counter()
    for indices in length_batches([len(r) for r in rows], batch_size):
        model.features(*pad([rows[i] for i in indices]), "ag")
    return sum(map(len, rows)) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--time", type=int, default=0, metavar="N", help="time the encoders on N rows")
    args = p.parse_args()
    splits = load_splits(args.data, load_tokenizer(args.model), args.max_len, Path(args.data) / ".cache")
    lengths = {task: {split: part.lengths() for split, part in by.items()} for task, by in splits.items()}
    reads = MultiTaskSampler({t: by["train"] for t, by in lengths.items()}, args.batch_size, args.seed).reads(
        0, 0, args.epochs)

    def total(arrays):
        return sum(len(a) for a in arrays), sum(int(a.sum()) for a in arrays)

    all_rows = total([by["train"] for by in lengths.values()] + [by["valid"] for by in lengths.values()] * args.epochs
                     + [by["test"] for by in lengths.values()])
    # each example once, as features.py keys them: by file (its bytes), task and row
    unique = {}
    for task, by in splits.items():
        for split, indices in (("train", reads[task]), ("valid", range(len(by["valid"]))),
                               ("test", range(len(by["test"])))):
            part = by[split]
            for i in indices:
                unique[(part.source, task, part.rows[i])] = len(part.input_ids[i])
    read_rows = len(unique), sum(unique.values())
    for name, (examples, pieces) in (("all rows", all_rows), ("read rows", read_rows)):
        print(f"{name:<10} {examples:>9,} examples {pieces:>12,} word pieces")
    print(f"ratio      {read_rows[0] / all_rows[0]:9.3f}          {read_rows[1] / all_rows[1]:12.3f}")
    if args.time:
        train = splits["ag"]["train"]
        rows = train.input_ids[::max(1, len(train) // args.time)][:args.time]
        torch.manual_seed(0)
        rates = {"--model": pieces_per_second(load_pretrained(args.model), rows),
                 "bert-base shape": pieces_per_second(Bert(BertConfig()), rows)}
        for name, rate in rates.items():
            print(f"{name:<16} {rate:10,.0f} word pieces/s on {len(rows):,} rows, {torch.get_num_threads()} threads")
        print(f"bert-base takes {rates['--model'] / rates['bert-base shape']:.2f} times as long")


if __name__ == "__main__":
    main()
