"""Text in, batches out: AG News and CoNLL-2003, the shared tokenizer, padding, and the multi-task sampler.

Reading order:
  files    read_ag_news (AG News CSV, cleaned) and read_conll (CoNLL-2003, IOB2)
  tokens   load_tokenizer, then encode_classification / encode_ner; NER labels
           sit on the first word piece of each word, and word_tags maps
           per-piece predictions back to one tag per word
  batches  collate pads one batch of one task; MultiTaskSampler decides which
           examples go together, with the same number per task each epoch;
           length_batches walks a whole split (evaluation, features)
  splits   load_splits reads, tokenizes and splits all of it (tokenized files
           are kept in the data cache, data_cache.py)

BERT's tokenizer (Devlin et al., 2019; Wu et al., 2016 for WordPiece) runs in
four steps, each one a component of the `tokenizers` library:
normalize (clean control characters, lower-case, strip accents, space out CJK
characters) -> pre-tokenize (split on whitespace and punctuation) -> WordPiece
(greedy longest match against vocab.txt, '##' marks a word's continuation)
-> post-process ([CLS] text [SEP]). A model folder's tokenizer.json spells
them out; model_folder.py builds the same from a bare vocab.txt. STS-B's
sentence pairs are read in sentence_pairs.py; `python data.py` prints a
summary of every split (data_summary.py).
"""

import csv
import io
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data_cache
from model_folder import byte_level, read_tokenizer
from runtime import DataError, Report, exit_status_of, read_text

AG_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # label = AG class - 1
NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
NER_ID = {tag: i for i, tag in enumerate(NER_TAGS)}
IGNORE_INDEX = -100  # label of pieces the NER loss skips; PyTorch's cross_entropy default


# --- Reading the files -----------------------------------------------------------

# AG News was scraped from HTML and stored with some damage. The `&` of HTML
# entities was lost (leaving " #39;" for an apostrophe), "$" was escaped as
# "\$", and line breaks inside a description became a lone backslash.
_AG_ENTITIES = {"#39": "'", "quot": '"', "amp": "&", "#36": "$"}
_AG_ENTITY = re.compile(r" ?(?<![\w&])(#39|quot|amp|#36);")  # not inside a word ("camp;"), not "&amp;"


def clean_ag_text(text):
    """Undo the AG News artefacts above, then collapse runs of spaces."""
    text = text.replace("\\$", "$")
    text = re.sub(r"\\+", " ", text)  # a backslash line join: "on\Wednesday" -> "on Wednesday"
    text = _AG_ENTITY.sub(lambda m: _AG_ENTITIES[m.group(1)], text)
    return re.sub(r"\s+", " ", text).strip()


def read_ag_news(path):
    """AG News CSV rows (class 1-4, title, description) -> [(title + " " + description, class - 1)]."""
    rows = []
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if len(row) != 3:
                raise DataError(f"{where}: expected 3 columns (class, title, description), found {len(row)}")
            label, title, description = row
            if label not in ("1", "2", "3", "4"):
                raise DataError(f"{where}: class must be 1, 2, 3 or 4, found {label!r}")
            rows.append((clean_ag_text(f"{title} {description}"), int(label) - 1))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def to_iob2(tags):
    """IOB1 -> IOB2: an entity that starts with I- (after O or another type) starts with B- instead.

    IOB1 uses B- only between two adjacent entities of one type; IOB2 opens
    every entity with B-. Tags already in IOB2 come back unchanged.
    """
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or tags[i - 1] == "O" or tags[i - 1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def read_conll(path):
    """CoNLL-2003 ("word POS chunk NER" per line, blank line between sentences) -> [(words, IOB2 tags)]."""
    sentences, words, tags = [], [], []
    lines = read_text(path).split("\n")
    for number, line in enumerate(lines + [""], start=1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if words:
                sentences.append((words, to_iob2(tags)))
            words, tags = [], []
            continue
        if len(columns) < 2:
            raise DataError(f"{path}:{number}: expected columns 'word POS chunk NER', found {len(columns)}")
        tag = columns[-1]
        if tag not in NER_ID:
            raise DataError(f"{path}:{number}: unknown NER tag {tag!r} (expected one of {', '.join(NER_TAGS)})")
        words.append(columns[0])
        tags.append(tag)
    if not sentences:
        raise DataError(f"{path}: no sentences (only blank or -DOCSTART- lines)")
    return sentences


def split_off(n, fraction, seed):
    """Seeded split of range(n): (kept indices, held-out indices), both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    held = round(n * fraction)
    return np.sort(order[held:]), np.sort(order[:held])


# --- The tokenizer -------------------------------------------------------------

def load_tokenizer(model_dir):
    """The tokenizer of a model folder (model_folder.read_tokenizer: tokenizer.json, else vocab.txt for
    BERT's WordPiece, else vocab.json + merges.txt for RoBERTa's byte-level BPE), with padding and
    truncation off whatever the file says: collate pads per batch, and _encode cuts to --max-len."""
    tokenizer = read_tokenizer(model_dir)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# --- Token ids and labels --------------------------------------------------------

@dataclass
class TaskData:
    """One split of one task, tokenized: example i is input_ids[i] with labels[i]."""
    task: str  # "ag" (classification) or "ner"
    input_ids: list  # per example: [CLS] pieces [SEP], at most max_len ids
    labels: list  # ag: one class id per example; ner: one tag id per piece, IGNORE_INDEX off first pieces
    truncated: list  # per example: True if it was cut at max_len
    word_tags: list = None  # ner: the gold IOB2 tag of every word, cut-off words included
    first_piece: list = None  # ner: per word, the position of its first piece; -1 if none is left
    source: str = None  # a fingerprint of the file and tokenization it came from (encode_file)
    rows: list = None  # per example, its row (ag) or sentence (ner) number in that file

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

    Inputs go in chunks, so that a runtime.Report can show progress on a large file.
    """
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


def encode_classification(rows, tokenizer, max_len, report=None):
    """[(text, label)] -> TaskData of [CLS] text [SEP]."""
    encodings = _encode(tokenizer, [text for text, _ in rows], max_len, report=report)
    return TaskData("ag", [e.ids for e in encodings], [label for _, label in rows],
                    [bool(e.overflowing) for e in encodings])


def encode_ner(sentences, tokenizer, max_len, report=None):
    """[(words, tags)] -> TaskData with each word's tag on its first piece and IGNORE_INDEX elsewhere.

    A byte-level BPE tokenizer gives every word after the first its leading-space
    form ("Ġcat"), as the words get in running text; given alone, each word
    would be tokenized as if it began the text.
    """
    spaced = byte_level(tokenizer)
    inputs = [[w if i == 0 or not spaced else " " + w for i, w in enumerate(words)] for words, _ in sentences]
    encodings = _encode(tokenizer, inputs, max_len, pretokenized=True, report=report)
    labels, first_pieces = [], []
    for (words, tags), encoding in zip(sentences, encodings):
        piece_labels = [IGNORE_INDEX] * len(encoding.ids)
        first = [-1] * len(words)
        for position, word in enumerate(encoding.word_ids):  # word is None for [CLS] and [SEP]
            if word is not None and first[word] == -1:
                first[word] = position
                piece_labels[position] = NER_ID[tags[word]]
        labels.append(piece_labels)
        first_pieces.append(first)
    return TaskData("ner", [e.ids for e in encodings], labels, [bool(e.overflowing) for e in encodings],
                    [tags for _, tags in sentences], first_pieces)


def word_tags(piece_tag_ids, first_piece):
    """Per-piece predicted tag ids -> one IOB2 tag per word, read at each word's first piece.

    A word with no piece left (cut at max_len) is tagged O, so entity F1 is
    still computed over every word of the sentence, as conlleval does.
    """
    return [NER_TAGS[piece_tag_ids[p]] if p >= 0 else "O" for p in first_piece]


def encode_file(path, task, tokenizer, max_len, cache_dir=None):
    """Read and tokenize one file, or take it from the data cache in cache_dir (data_cache.py).

    The result's `source` fingerprints the file's bytes, the tokenizer and
    max_len (the checkpoint and the frozen-backbone features are keyed by it).
    """
    path = Path(path)
    key = data_cache.key(path, tokenizer, max_len) if path.exists() else None
    cached = data_cache.load(cache_dir, path, key, NER_TAGS)  # a TaskData's fields, or None
    if cached is not None:
        return _with_source(TaskData(**cached), key)
    examples = read_ag_news(path) if task == "ag" else read_conll(path)  # a missing file raises its error here
    report = Report(f"tokenizing {path.parent.name}/{path.name}", len(examples))
    encode = encode_classification if task == "ag" else encode_ner
    data = _with_source(encode(examples, tokenizer, max_len, report), key)
    data_cache.save(cache_dir, path, key, data, NER_TAGS)
    return data


def _with_source(data, key):
    data.source, data.rows = key, list(range(len(data)))
    return data


# --- Batches ---------------------------------------------------------------------

def collate(data, indices, pad_id=0, multiple=1):
    """Pad the chosen examples of one task to the longest among them.

    With multiple > 1 the width is rounded up to a multiple of it, so that
    batches come in few shapes (torch.compile compiles once per shape).
    Returns the task name, input_ids and attention_mask (B, T), and labels:
    (B,) class ids for ag, (B, T) tag ids for ner with IGNORE_INDEX on padding.
    """
    input_ids, attention_mask = pad([data.input_ids[i] for i in indices], pad_id, multiple)
    if data.task == "ner":
        labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(indices):
            labels[row, :len(data.labels[i])] = data.labels[i]
    else:
        labels = np.array([data.labels[i] for i in indices], dtype=np.int64)
    return {"task": data.task, "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.from_numpy(labels)}


def pad(rows, pad_id=0, multiple=1):
    """Token id lists -> input_ids and attention_mask (B, T), T the longest row rounded up to `multiple`."""
    width = -(-max(map(len, rows)) // multiple) * multiple
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for row, ids in enumerate(rows):
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def length_batches(lengths, batch_size, rank=0, world_size=1):
    """Example indices in batches of similar length over a whole split, for evaluation and features
    (order does not matter there); batch b goes to rank b % world_size only. Longest first: the first
    batch then allocates the largest buffers and every later one fits in them (shortest first, the
    heap grew to 12 GB over one pass of MiniLM on 120,000 rows)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[start:start + batch_size].tolist() for b, start in enumerate(range(0, len(lengths), batch_size))
            if b % world_size == rank]


@dataclass(frozen=True)
class Batching:
    """How a whole split is cut into batches (evaluation, features): examples per batch, and collate's padding."""
    size: int
    pad_id: int = 0  # [PAD] (BERT), <pad> (RoBERTa): config.pad_token_id
    multiple: int = 1  # 8 under --compile, so that batches come in few shapes


class MultiTaskSampler:
    """Which examples form each batch, epoch by epoch, for several tasks at once.

    - Every epoch takes n = min(task sizes) examples from each task. The
      larger task walks through shuffled passes of all its examples, n at a
      time, so consecutive epochs see different examples and all are used.
    - Every batch holds one task; the order of the tasks' batches is shuffled.
    - group_window > 0 sorts examples by length inside windows of that many
      batches before cutting batches: less padding, but less random batches.
    - With world_size > 1 (data-parallel training), batches are global:
      batch_size x world_size examples, and share() gives rank r its r-th
      part. So every rank runs the same task at the same step, shares are
      disjoint, every rank has as many steps as the others, and a run on W
      ranks sees the same global batches as one process with W times the
      batch size. A last global batch too small to give every rank an
      example is dropped.
    - Everything depends only on (seed, epoch), so a run can resume at any epoch.
    """

    def __init__(self, lengths, batch_size, seed=0, group_window=50, rank=0, world_size=1):
        self.lengths = {task: np.asarray(v) for task, v in sorted(lengths.items())}  # task -> lengths
        self.batch_size = batch_size * world_size  # global batch
        self.seed, self.group_window, self.rank, self.world_size = seed, group_window, rank, world_size
        self.per_task = min(len(v) for v in self.lengths.values())

    def _draw(self, task_no, size, epoch):
        """This epoch's per_task examples of a task with `size` examples.

        A lap is one shuffled pass over the task, served per_task at a time
        over ceil(size / per_task) epochs; the lap's last epoch tops up its
        short slice from the lap's start. So no epoch repeats an example, and
        every lap uses every example.
        """
        n = self.per_task
        lap, slot = divmod(epoch, -(-size // n))
        order = np.random.default_rng([self.seed, task_no, lap]).permutation(size)
        chosen = order[slot * n:(slot + 1) * n]
        return np.concatenate([chosen, order[:n - len(chosen)]])

    def _batches(self, chosen, lengths):
        if self.group_window:
            span = self.group_window * self.batch_size
            windows = [chosen[i:i + span] for i in range(0, len(chosen), span)]
            chosen = np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in windows])
        return [chosen[i:i + self.batch_size].tolist() for i in range(0, len(chosen), self.batch_size)]

    def epoch(self, epoch):
        """[(task, example indices of the global batch)], in training order."""
        batches = []
        for task_no, (task, lengths) in enumerate(self.lengths.items()):
            batches += [(task, b) for b in self._batches(self._draw(task_no, len(lengths), epoch), lengths)
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

AG_VALID_FRACTION = 0.05  # AG News has no validation split: hold out 5% of train (train.py --ag-valid-fraction)


def load_splits(data_dir, tokenizer, max_len, cache_dir=None, splits=("train", "valid", "test"),
                ag_valid_fraction=AG_VALID_FRACTION):
    """{"ag": {split: TaskData}, "ner": {split: TaskData}} from the data directory (see download.py).

    The AG validation rows are fixed (seed 0), not drawn by a run's --seed,
    so that runs with different seeds are compared on the same examples. A
    larger ag_valid_fraction holds out a superset of a smaller one's rows.
    """
    data_dir = Path(data_dir)
    files = [f"ag_news/{'train' if s == 'valid' else s}.csv" for s in splits] + [f"conll2003/{s}.txt" for s in splits]
    if missing := [name for name in dict.fromkeys(files) if not (data_dir / name).is_file()]:  # before any is read
        raise DataError(f"{data_dir / missing[0]}: not found; run `python download.py` first (a run reads "
                        f"{', '.join(dict.fromkeys(files))} in {data_dir})")
    out = {"ag": {}, "ner": {}}
    if "train" in splits or "valid" in splits:
        path = data_dir / "ag_news" / "train.csv"
        ag_train = encode_file(path, "ag", tokenizer, max_len, cache_dir)
        kept, held = split_off(len(ag_train), ag_valid_fraction, seed=0)
        if not len(held) or not len(kept):  # a run would pick its best epoch on no rows at all
            fewest = next(n for n in itertools.count(int(0.5 / min(ag_valid_fraction, 1 - ag_valid_fraction)))
                          if 0 < round(n * ag_valid_fraction) < n)
            raise DataError(f"{path}: {len(ag_train)} rows leave no {'validation' if len(kept) else 'training'} rows "
                            f"({ag_valid_fraction:.0%} of train are held out for validation); give it at least "
                            f"{fewest} rows")
        out["ag"].update(train=ag_train.subset(kept), valid=ag_train.subset(held))
    if "test" in splits:
        out["ag"]["test"] = encode_file(data_dir / "ag_news" / "test.csv", "ag", tokenizer, max_len, cache_dir)
    for split in splits:
        out["ner"][split] = encode_file(data_dir / "conll2003" / f"{split}.txt", "ner", tokenizer, max_len, cache_dir)
    for task in out:
        out[task] = {s: out[task][s] for s in splits}
    return out


def limit_split(data, limit):
    """A fixed random subset of at most `limit` examples (the same whatever a run's --seed is)."""
    if limit is None or len(data) <= limit:
        return data
    return data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[:limit]).tolist())


if __name__ == "__main__":  # python data.py --data DIR --model DIR: a summary of every split
    import data_summary
    sys.exit(exit_status_of(data_summary.main))
