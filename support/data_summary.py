"""A summary of every split: what `python data.py --data DIR --model DIR` prints.

data.py hands main() its own module (`reading`) rather than this module importing
data.py, so that imports run one way.

Per task and split: examples, label counts, word pieces per example (mean,
95th percentile, longest) and how many were cut at --max-len; then what one
training epoch of the multi-task sampler costs in padding, with and without
length grouping.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from support.runtime import MAX_SEED, DataError, HelpFormatter, UsageError
from support.task_files import parse_tasks


def padding_fraction(batches, lengths):
    """Share of padded positions in [(task, indices)] batches, given per-task example lengths."""
    real = padded = 0
    for task, indices in batches:
        sizes = lengths[task][indices]
        real += int(sizes.sum())
        padded += int(sizes.max()) * len(indices)
    return 1 - real / padded


def split_summary(data):
    """One summary row: examples, label counts, word pieces per example, share truncated."""
    task = data.task
    if task.level == "sentence":
        counts = np.bincount(data.labels, minlength=len(task.labels))
        labels = " ".join(f"{name} {c:,}" for name, c in zip(task.labels, counts))
    elif task.metric == "entity_f1":
        entities = [tag[2:] for tags in data.word_tags for tag in tags if tag.startswith("B-")]
        kinds = dict.fromkeys(label[2:] for label in task.labels if label.startswith("B-"))
        labels = f"{sum(len(tags) for tags in data.word_tags):,} words; entities " + " ".join(
            f"{kind} {entities.count(kind):,}" for kind in kinds)
    else:
        tags = [tag for tags in data.word_tags for tag in tags]
        common = sorted(set(tags), key=lambda t: (-tags.count(t), t))[:4]
        labels = f"{len(tags):,} words; {len(set(tags))} tags, most often " + " ".join(
            f"{t} {tags.count(t):,}" for t in common)
    lengths = data.lengths()
    return (f"{len(data):>7,}  {labels:<62}  {lengths.mean():6.1f} {np.percentile(lengths, 95):5.0f} "
            f"{lengths.max():5d}  {sum(data.truncated):,} ({np.mean(data.truncated):.2%})")


def main(argv, reading):
    """reading: the data.py module, which calls this."""
    p = argparse.ArgumentParser(description="Read, tokenize and summarize every task's files (AG News and "
                                "CoNLL-2003 by default).", formatter_class=HelpFormatter)
    p.add_argument("--data", default="data", help="data directory written by download.py")
    p.add_argument("--model", help="model folder with the tokenizer (default: DATA/bert-base-uncased)")
    p.add_argument("--tasks", default="ag,ner", help="built-in tasks and task files, as train.py --tasks takes")
    p.add_argument("--max-len", type=int, default=128, help="word pieces per example, [CLS] and [SEP] included")
    p.add_argument("--batch-size", type=int, default=32,
                   help="examples per batch of the training epoch whose padding is measured")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler's order of that epoch")
    p.add_argument("--splits", default="train,valid,test", help="comma-separated, from train,valid,test")
    p.add_argument("--no-data-cache", action="store_true", help="tokenize again instead of using DATA/.cache")
    args = p.parse_args(argv)
    args.model = args.model or str(Path(args.data) / "bert-base-uncased")
    splits = tuple(args.splits.split(","))
    try:
        if not splits or not set(splits) <= {"train", "valid", "test"}:
            raise UsageError(f"argument --splits: expected names from train,valid,test, got {args.splits!r}")
        if args.max_len < 3:
            raise UsageError(f"argument --max-len: must be at least 3, got {args.max_len}")
        if args.batch_size < 1:
            raise UsageError(f"argument --batch-size: must be at least 1, got {args.batch_size}")
        if not 0 <= args.seed <= MAX_SEED:  # the sampler's generator takes no other
            raise UsageError(f"argument --seed: must be a whole number from 0 to {MAX_SEED}, got {args.seed}")
        start = time.perf_counter()
        tokenizer = reading.load_tokenizer(args.model)
        cache_dir = None if args.no_data_cache else Path(args.data) / ".cache"
        data = reading.load_splits(args.data, tokenizer, args.max_len, cache_dir, splits, tasks=parse_tasks(args.tasks))
        seconds = time.perf_counter() - start
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'split':<11}{'examples':>8}  {'labels':<62}  {'pieces: mean':>12} {'p95':>5} {'max':>5}  truncated")
    for task, by_split in data.items():
        for split, part in by_split.items():
            print(f"{task + ' ' + split:<11} {split_summary(part)}")
    print(f"read and tokenized in {seconds:.1f} s (max_len {args.max_len}, "
          f"{'no cache' if cache_dir is None else f'cache in {cache_dir}'})")
    if "train" in splits:
        train = {task: by_split["train"] for task, by_split in data.items()}
        lengths = {task: part.lengths() for task, part in train.items()}
        for window in (0, 50):
            sampler = reading.MultiTaskSampler(lengths, args.batch_size, args.seed, group_window=window)
            start = time.perf_counter()
            batches = sampler.epoch(0)
            for task, indices in batches:
                reading.collate(train[task], indices)  # pad id 0: the ids are not used, only the time
            seconds = time.perf_counter() - start
            grouping = "grouped by length in windows of 50 batches" if window else "no length grouping"
            print(f"one training epoch: {sampler.per_task:,} examples per task, {len(batches):,} batches of "
                  f"{args.batch_size}, padding {padding_fraction(batches, lengths):.1%} ({grouping}); "
                  f"sampled and collated in {seconds:.2f} s")
    return 0


