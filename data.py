"""Text in, batches out: the tasks of support/tasks.py, the shared tokenizer, padding, the sampler.

Reading order (support/readers.py reads a task's files into examples):
  tokens   load_tokenizer, then encode: a word's tag sits on its first word piece, and
           word_tags maps per-piece predictions back to words
  batches  collate pads one batch of one task; MultiTaskSampler decides which examples go
           together and how many of each task an epoch takes; length_batches walks a whole
           split (evaluation, features)
  splits   load_splits reads, tokenizes (data_cache.py keeps the result) and splits every task

BERT's tokenizer (Devlin et al., 2019; Wu et al., 2016 for WordPiece) runs in
four steps, each one a component of the `tokenizers` library:
normalize (clean control characters, lower-case, strip accents, space out CJK
characters) -> pre-tokenize (split on whitespace and punctuation) -> WordPiece
(greedy longest match against vocab.txt, '##' marks a word's continuation)
-> post-process ([CLS] text [SEP]). A model folder's tokenizer.json spells
them out; support/model_folder.py builds the same from a bare vocab.txt. STS-B's
sentence pairs are read in support/sentence_pairs.py; `python data.py` prints a
summary of every split (support/data_summary.py).
"""

import itertools
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from support import data_cache
from support.model_folder import byte_level, read_tokenizer
from support.readers import read_examples
from support.runtime import DataError, Report, exit_status_of
from support.tasks import SEED_TASKS, TASKS, Task

IGNORE_INDEX = -100  # label of the word pieces the loss skips (all but each word's first)


def split_off(n, fraction, seed):
    """Seeded split of range(n): (kept indices, held-out indices), both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    held = round(n * fraction)
    return np.sort(order[held:]), np.sort(order[:held])


# --- The tokenizer -------------------------------------------------------------

def load_tokenizer(model_dir):
    """The tokenizer of a model folder (tokenizer.json, else vocab.txt for BERT's WordPiece, else
    vocab.json + merges.txt for RoBERTa's byte-level BPE), with padding and truncation off
    whatever the file says: collate pads per batch, and _encode cuts to --max-len."""
    tokenizer = read_tokenizer(model_dir)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# --- Token ids and labels --------------------------------------------------------

@dataclass
class TaskData:
    """One split of one task, tokenized: example i is input_ids[i] with labels[i]."""
    task: Task  # its row of the task table, with its labels resolved
    input_ids: list  # per example: [CLS] pieces [SEP], at most max_len ids
    labels: list  # a label id, or (word level) a tag id per piece, IGNORE_INDEX off first pieces
    truncated: list  # per example: True if it was cut at max_len
    word_tags: list = None  # word level: the gold tag of every word, cut-off words included
    first_piece: list = None  # word level: each word's first piece, or -1 if none is left
    source: str = None  # a fingerprint of the file and tokenization it came from (encode_file)
    rows: list = None  # per example, its row or sentence number in that file

    def __len__(self):
        return len(self.input_ids)

    def lengths(self):
        return np.array([len(ids) for ids in self.input_ids])

    def subset(self, indices):
        def pick(rows):
            return None if rows is None else [rows[i] for i in indices]
        return TaskData(self.task, pick(self.input_ids), pick(self.labels), pick(self.truncated),
                        pick(self.word_tags), pick(self.first_piece), self.source, pick(self.rows))


def _encode(tokenizer, inputs, max_len, pretokenized=False, report=None, chunk=4096):
    """The batch API with truncation to max_len ids, [CLS] and [SEP] included; [SEP] is kept.
    Inputs go in chunks, so that a runtime.Report can show progress on a large file."""
    tokenizer.enable_truncation(max_len)
    encodings = []
    try:
        for start in range(0, len(inputs), chunk):
            part = inputs[start:start + chunk]
            encodings += tokenizer.encode_batch(part, is_pretokenized=pretokenized)
            if report is not None:
                report.update(len(part))
    finally:
        tokenizer.no_truncation()  # leave the shared tokenizer as load_tokenizer made it
    return encodings


def encode(examples, task, tokenizer, max_len, report=None):
    """A task's examples (read_examples: labels by name) -> TaskData, by the task's level."""
    label_id = {label: i for i, label in enumerate(task.labels)}
    if task.level == "sentence":  # [CLS] text [SEP], one label
        encodings = _encode(tokenizer, [text for text, _ in examples], max_len, report=report)
        labels = [label_id[label] for _, label in examples]
        return TaskData(task, [e.ids for e in encodings], labels,
                        [bool(e.overflowing) for e in encodings])
    # Word level: each word's tag on its first piece, IGNORE_INDEX elsewhere. A byte-level BPE
    # tokenizer gives every word after the first its leading-space form ("Ġcat"), as the words get
    # in running text; given alone, each word would be tokenized as if it began the text.
    spaced = byte_level(tokenizer)
    inputs = [[w if i == 0 or not spaced else " " + w for i, w in enumerate(ws)]
              for ws, _ in examples]
    encodings = _encode(tokenizer, inputs, max_len, pretokenized=True, report=report)
    labels, first_pieces = [], []
    for (words, tags), encoding in zip(examples, encodings):
        piece_labels = [IGNORE_INDEX] * len(encoding.ids)
        first = [-1] * len(words)
        for position, word in enumerate(encoding.word_ids):  # word is None for [CLS] and [SEP]
            if word is not None and first[word] == -1:
                first[word] = position
                piece_labels[position] = label_id[tags[word]]
        labels.append(piece_labels)
        first_pieces.append(first)
    truncated = [bool(e.overflowing) for e in encodings]
    return TaskData(task, [e.ids for e in encodings], labels, truncated, [t for _, t in examples],
                    first_pieces)


def word_tags(piece_tag_ids, first_piece, tags):
    """Per-piece predicted tag ids -> one of `tags` per word, read at each word's first piece.
    A word with no piece left (cut at max_len) is tagged O, so a sentence is still scored over
    all its words, as conlleval does: outside any entity, and wrong for a tag set without O."""
    return [tags[piece_tag_ids[p]] if p >= 0 else "O" for p in first_piece]


def encode_file(path, task, tokenizer, max_len, cache_dir=None):
    """Read and tokenize a task's file, or take it from the data cache in cache_dir (data_cache.py).
    The result's `source` fingerprints the file's bytes, how the task reads it, the tokenizer and
    max_len (the checkpoint and the frozen-backbone features are keyed by it)."""
    path = Path(path)
    key = data_cache.key(path, tokenizer, max_len, task) if path.exists() else None
    cached = data_cache.load(cache_dir, path, key, task)  # a TaskData's fields, or None
    if cached is not None:
        return _with_source(TaskData(task, **cached), key)
    examples = read_examples(path, task)  # a missing file raises its error here
    report = Report(f"tokenizing {path.parent.name}/{path.name}", len(examples))
    data = _with_source(encode(examples, task, tokenizer, max_len, report), key)
    data_cache.save(cache_dir, path, key, data)
    return data


def _with_source(data, key):
    data.source, data.rows = key, list(range(len(data)))
    return data


# --- Batches ---------------------------------------------------------------------

def collate(data, indices, pad_id=0, multiple=1):
    """Pad the chosen examples of one task to the longest among them, rounded up to `multiple`
    so that batches come in few shapes (torch.compile compiles once per shape). Returns the
    task's name, input_ids and attention_mask (B, T), and labels: (B,) label ids (sentence
    level), or (B, T) tag ids (word level) with IGNORE_INDEX on padding."""
    input_ids, attention_mask = pad([data.input_ids[i] for i in indices], pad_id, multiple)
    if data.task.level == "word":
        labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(indices):
            labels[row, :len(data.labels[i])] = data.labels[i]
    else:
        labels = np.array([data.labels[i] for i in indices], dtype=np.int64)
    return {"task": data.task.name, "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.from_numpy(labels)}


def pad(rows, pad_id=0, multiple=1):
    """Id lists -> input_ids, attention_mask (B, T), T the longest row rounded up to `multiple`."""
    width = -(-max(map(len, rows)) // multiple) * multiple
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for row, ids in enumerate(rows):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def length_batches(lengths, batch_size, rank=0, world_size=1):
    """Example indices in batches of similar length over a whole split, for evaluation and features
    (order does not matter there); batch b goes to rank b % world_size only. Longest first: the
    first batch allocates the largest buffers and every later one fits in them."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[start:start + batch_size].tolist()
            for b, start in enumerate(range(0, len(lengths), batch_size)) if b % world_size == rank]


@dataclass(frozen=True)
class Batching:
    """How evaluation and features cut a split into batches: their size, and collate's padding."""
    size: int
    pad_id: int = 0  # [PAD] (BERT), <pad> (RoBERTa): config.pad_token_id
    multiple: int = 1  # 8 under --compile, so that batches come in few shapes


SAMPLING = ("min", "proportional", "temperature:T", "annealed")  # train.py --sampling


class MultiTaskSampler:
    """Which examples form each batch, epoch by epoch, for several tasks at once.

    - How many examples each task gives an epoch (sampling, counts()). Every rule draws
      tasks x n in all, n the smallest task's size, so that rules compare at the same cost;
      they differ in the shares:
        min            n from every task (the default)
        proportional   p(task) ~ size (sentence-transformers' rule)
        temperature:T  p(task) ~ size^(1/T) (T5; jiant): T = 1 is proportional, a larger T
                       gives the small tasks more
        annealed:E     p(task) ~ size^a, a falling from 1 (proportional) in the first epoch to
                       0.2 (nearly uniform) in the last (Stickland & Murray, 2019, "BERT and PALs")
      A task walks through shuffled passes of all its examples, so consecutive
      epochs see different examples and all are used (_draw).
    - Every batch holds one task; the order of the tasks' batches is shuffled.
    - group_window > 0 sorts examples by length inside windows of that many
      batches before cutting batches: less padding, but less random batches.
    - With world_size > 1 (data-parallel training), batches are global: batch_size x
      world_size examples, of which share() gives rank r the r-th part. So every rank runs
      the same task at the same step, shares are disjoint, all ranks take as many steps, and
      W ranks see the same global batches as one process with W times the batch size. A last
      global batch too small to give every rank an example is dropped.
    - Everything depends only on (seed, epoch), so a run can resume at any epoch.
    """

    def __init__(self, lengths, batch_size, seed=0, group_window=50, ranks=(0, 1), sampling="min"):
        """ranks: (this process's rank, the number of ranks); sampling: a rule above."""
        self.lengths = {task: np.asarray(v) for task, v in sorted(lengths.items())}  # by task
        (self.rank, self.world_size), self.sampling = ranks, sampling
        self.batch_size = batch_size * self.world_size  # global batch
        self.seed, self.group_window = seed, group_window
        self.per_task = min(len(v) for v in self.lengths.values())

    def counts(self, epoch):
        """{task: how many of its examples this epoch takes}."""
        sizes = np.array([len(v) for v in self.lengths.values()], dtype=np.float64)
        if self.sampling == "min":
            return dict.fromkeys(self.lengths, self.per_task)
        if self.sampling == "proportional":
            power = 1.0
        elif self.sampling.startswith("annealed:"):
            power = 1 - 0.8 * epoch / max(1, int(self.sampling.split(":")[1]) - 1)
        else:  # "temperature:T"
            power = 1 / float(self.sampling.split(":")[1])
        share = sizes ** power / (sizes ** power).sum()
        budget = len(sizes) * self.per_task  # what the min rule draws
        return {task: max(1, round(p * budget)) for task, p in zip(self.lengths, share)}

    def _draw(self, task_no, size, n, epoch):
        """This epoch's n examples of a task with `size` examples.

        A lap is one shuffled pass over the task, served n at a time over ceil(size / n) epochs;
        the lap's last epoch tops up its short slice from the lap's start. So no epoch repeats an
        example, and every lap uses every example. A task drawn more than its size (temperature
        sampling's small tasks) takes whole laps of its own each epoch.
        """
        if n > size:
            laps = [np.random.default_rng([self.seed, task_no, epoch, j]).permutation(size)
                    for j in range(-(-n // size))]
            return np.concatenate(laps)[:n]
        lap, slot = divmod(epoch, -(-size // n))
        order = np.random.default_rng([self.seed, task_no, lap]).permutation(size)
        chosen = order[slot * n:(slot + 1) * n]
        return np.concatenate([chosen, order[:n - len(chosen)]])

    def _batches(self, chosen, lengths):
        if self.group_window:
            span = self.group_window * self.batch_size
            windows = [chosen[i:i + span] for i in range(0, len(chosen), span)]
            chosen = np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in windows])
        return [chosen[i:i + self.batch_size].tolist()
                for i in range(0, len(chosen), self.batch_size)]

    def epoch(self, epoch):
        """[(task, example indices of the global batch)], in training order."""
        batches, counts = [], self.counts(epoch)
        for task_no, (task, lengths) in enumerate(self.lengths.items()):
            chosen = self._draw(task_no, len(lengths), counts[task], epoch)
            batches += [(task, b) for b in self._batches(chosen, lengths)
                        if len(b) >= self.world_size]
        order = np.random.default_rng([self.seed, epoch, 1_000_003]).permutation(len(batches))
        return [batches[i] for i in order]

    def reads(self, first_epoch, first_batch, last_epoch):
        """{task: sorted example indices} that this rank's shares read from batch first_batch of
        first_epoch up to the end of epoch last_epoch - 1."""
        read = {task: set() for task in self.lengths}
        for epoch in range(first_epoch, last_epoch):
            for task, indices in self.epoch(epoch)[first_batch if epoch == first_epoch else 0:]:
                read[task].update(self.share(indices))
        return {task: sorted(indices) for task, indices in read.items()}

    def share(self, indices):
        """This rank's part of a global batch: the r-th of world_size nearly equal slices."""
        n, w, r = len(indices), self.world_size, self.rank
        return indices[r * n // w:(r + 1) * n // w]


# --- All splits --------------------------------------------------------------------

SPLITS = ("train", "valid", "test")


def load_splits(data_dir, tokenizer, max_len, cache_dir=None, splits=SPLITS, tasks=None):
    """{task name: {split: TaskData}} for the tasks (rows of the task table; default: the seed's
    two), their files read from data_dir (see download.py) unless a path is absolute.

    A task without a "valid" file holds out task.valid_fraction of its train rows, fixed (seed 0)
    rather than drawn by a run's --seed, so that runs with different seeds are compared on the
    same examples; a larger fraction holds out a superset of a smaller one's rows. A task whose
    labels the table leaves open takes those of its train file, sorted.
    """
    data_dir, tasks = Path(data_dir), tasks or [TASKS[name] for name in SEED_TASKS]
    files = [t.files["train" if s == "valid" and "valid" not in t.files else s]
             for t in tasks for s in splits]
    # Every file is checked before any is read.
    if missing := [name for name in dict.fromkeys(files) if not (data_dir / name).is_file()]:
        raise DataError(f"{data_dir / missing[0]}: not found; run `python download.py` first "
                        f"(a run reads {', '.join(dict.fromkeys(files))} in {data_dir})")
    out = {}
    for task in tasks:
        path = {split: data_dir / name for split, name in task.files.items()}
        if task.labels is None:  # those of its train file
            examples = read_examples(path["train"], task)
            found = {y for _, labels in examples
                     for y in ([labels] if task.level == "sentence" else labels)}
            task = replace(task, labels=tuple(sorted(found)))
        read = [s for s in splits if s != "valid" or "valid" in path]
        by = {s: encode_file(path[s], task, tokenizer, max_len, cache_dir) for s in read}
        if {"train", "valid"} & set(splits) and "valid" not in path:  # same train rows either way
            train = (by.get("train")
                     or encode_file(path["train"], task, tokenizer, max_len, cache_dir))
            share = task.valid_fraction
            kept, held = split_off(len(train), share, seed=0)
            if not len(held) or not len(kept):  # a run would pick its best epoch on no rows at all
                fewest = next(n for n in itertools.count(int(0.5 / min(share, 1 - share)))
                              if 0 < round(n * share) < n)
                raise DataError(f"{path['train']}: {len(train)} rows leave no "
                                f"{'validation' if len(kept) else 'training'} rows "
                                f"({share:.0%} of train are held out for validation); "
                                f"give it at least {fewest} rows")
            by.update(train=train.subset(kept), valid=train.subset(held))
        out[task.name] = {s: by[s] for s in splits}
    return out


def limit_split(data, limit):
    """A fixed random subset of at most `limit` examples (the same whatever a run's --seed is)."""
    if limit is None or len(data) <= limit:
        return data
    return data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[:limit]).tolist())


if __name__ == "__main__":  # python data.py --data DIR --model DIR: a summary of every split
    from support import data_summary
    sys.exit(exit_status_of(lambda: data_summary.main(sys.argv[1:], sys.modules[__name__])))
