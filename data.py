"""Text in, batches out: both datasets, the shared tokenizer, and the multi-task sampler.

Reading order:
  files    read_ag_news (AG News CSV, cleaned) and read_conll (CoNLL-2003, IOB2)
  tokens   load_tokenizer, then encode_classification / encode_ner; NER labels
           sit on the first word piece of each word, and word_tags maps
           per-piece predictions back to one tag per word
  batches  collate pads one batch of one task; MultiTaskSampler decides which
           examples go together, with the same number per task each epoch;
           batches_by_length walks a whole split (evaluation, features)
  splits   load_splits reads, tokenizes (with an on-disk cache) and splits all of it
  CLI      python data.py --data DIR --model DIR prints a summary of every split

BERT's tokenizer (Devlin et al., 2019; Wu et al., 2016 for WordPiece) runs in
four steps, each one a component of the `tokenizers` library:
normalize (clean control characters, lower-case, strip accents, space out CJK
characters) -> pre-tokenize (split on whitespace and punctuation) -> WordPiece
(greedy longest match against vocab.txt, '##' marks a word's continuation)
-> post-process ([CLS] text [SEP]).
"""

import argparse
import csv
import hashlib
import io
import itertools
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from runtime import Report, atomic_write, run_tool

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
AG_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # label = AG class - 1
NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
NER_ID = {tag: i for i, tag in enumerate(NER_TAGS)}
IGNORE_INDEX = -100  # label of pieces the NER loss skips; PyTorch's cross_entropy default


class DataError(ValueError):
    """An input file that cannot be used; the message is one line naming the file."""


# --- Reading the files -----------------------------------------------------------

def _read_text(path):
    """The whole file as text, without a leading byte-order mark; a missing, binary or non-UTF-8 file is a
    DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `python download.py` first") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path}:{line}: binary data (a NUL byte), not a text file")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (spreadsheets write one) is not part of the text
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


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
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
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
    lines = _read_text(path).split("\n")
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


STSB_COLUMNS = "genre, file, year, id, score, sentence 1, sentence 2"


def read_stsb(path):
    """STS benchmark lines (Cer et al., 2017) -> [(sentence 1, sentence 2, score 0-5)].

    Tab-separated: genre, file, year, id, score, sentence 1, sentence 2, and on
    some lines two source columns more. There is no quoting: a lone " is part
    of a sentence, so the lines are split on tabs, never read as CSV.
    """
    pairs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) < 7:
            raise DataError(f"{path}:{number}: expected 7 tab-separated columns ({STSB_COLUMNS}), "
                            f"found {len(columns)}")
        try:
            score = float(columns[4])
        except ValueError:
            raise DataError(f"{path}:{number}: the score {columns[4]!r} is not a number") from None
        if not 0 <= score <= 5:
            raise DataError(f"{path}:{number}: the score {columns[4]} is outside 0-5")
        pairs.append((columns[5], columns[6], score))
    if not pairs:
        raise DataError(f"{path}: no sentence pairs")
    return pairs


def split_off(n, fraction, seed):
    """Seeded split of range(n): (kept indices, held-out indices), both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    held = round(n * fraction)
    return np.sort(order[held:]), np.sort(order[:held])


# --- The tokenizer -------------------------------------------------------------

def _wordpiece_from_vocab(path):
    """The lower-casing BERT WordPiece tokenizer, built from a vocab.txt (one piece per line)."""
    vocab = {}
    lines = io.StringIO(_read_text(path), newline=None)  # universal newlines, as open() reads it
    for index, line in enumerate(lines):
        vocab[line.rstrip("\n")] = index  # a repeated line keeps its last index, as in BertTokenizer
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{path}: lacks the special tokens {', '.join(missing)}")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents=None means "follow lowercase", so accents are stripped, as in uncased BERT.
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Special tokens written in the text ("[MASK]") map to their ids, unsplit.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def _byte_level_bpe_from_files(vocab_path, merges_path):
    """RoBERTa's tokenizer, built from vocab.json + merges.txt (Radford et al., 2019: byte-level BPE).

    Every byte of the UTF-8 text maps to a printable character ("Ġ" is the
    space), so there is no unknown token; a word that follows a space is a
    different token from the same word at the start ("Ġcat" vs "cat"). The
    template is <s> A </s>, and <s> A </s></s> B </s> for a pair.
    """
    try:
        vocab = json.loads(_read_text(vocab_path))
    except json.JSONDecodeError as e:
        raise DataError(f"{vocab_path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict):
        raise DataError(f"{vocab_path}: expected a JSON object of token -> id")
    missing = [t for t in ROBERTA_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{vocab_path}: lacks the special tokens {', '.join(missing)}")
    merges = [tuple(line.split(" ")) for line in _read_text(merges_path).splitlines()
              if line and not line.startswith("#version")]
    bad = next((n for n, m in enumerate(merges, start=1) if len(m) != 2), None)
    if bad is not None:
        raise DataError(f"{merges_path}:{bad}: expected two tokens separated by one space")
    tokenizer = Tokenizer(BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(ROBERTA_SPECIAL_TOKENS))
    return tokenizer


def load_tokenizer(model_dir):
    """The tokenizer of a model folder: tokenizer.json if present, else vocab.txt (BERT's WordPiece),
    else vocab.json + merges.txt (RoBERTa's byte-level BPE).

    Padding and truncation are switched off whatever the file says: the
    callers pad per batch and truncate to their own --max-len.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"{model_dir}: model folder not found; run `python download.py` first")
    if (model_dir / "tokenizer.json").exists():
        path = model_dir / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise DataError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
    elif (model_dir / "vocab.txt").exists():
        tokenizer = _wordpiece_from_vocab(model_dir / "vocab.txt")
    elif (model_dir / "vocab.json").exists() and (model_dir / "merges.txt").exists():
        tokenizer = _byte_level_bpe_from_files(model_dir / "vocab.json", model_dir / "merges.txt")
    else:
        empty = Path(model_dir).is_dir() and not any(Path(model_dir).iterdir())
        raise DataError(f"{model_dir}: has neither tokenizer.json nor vocab.txt (nor vocab.json + merges.txt)"
                        + ("; the folder is empty" if empty else "")
                        + "; `python download.py` fetches bert-base-uncased, `--only NAME` another backbone")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")  # what load_tokenizer reads, and what tells transformers how


def copy_tokenizer(model_dir, out_dir):
    """Copy the tokenizer files of a model folder to out_dir (a run folder), so that out_dir is a
    complete model folder: load_tokenizer, predict.py and embed.py read it as they read model_dir."""
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).exists():
            atomic_write(Path(out_dir) / name, lambda tmp: shutil.copyfile(Path(model_dir) / name, tmp))


def check_fits(tokenizer, config, max_len, model_dir):
    """The tokenizer's ids and max_len must fit the model's embedding tables."""
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise DataError(f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} entries, "
                        f"more than vocab_size {config.vocab_size} in config.json")
    if max_len > config.max_len:
        raise DataError(f"argument --max-len: {max_len} is more than the model's "
                        f"max_position_embeddings ({config.max_position_embeddings})"
                        + (f" less the {config.position_start} position ids {config.model_type} skips"
                           if config.position_start else ""))


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


@dataclass
class PairData:
    """Sentence pairs, tokenized for a bi-encoder or a cross-encoder, with gold scores in 0-5.

    cross: pair i is input_ids[i] in the tokenizer's pair template, with segment ids token_type_ids[i].
    bi:    pair i is two sentences tokenized alone, input_ids[i] (a) and b_ids[i] (b).
    """
    input_ids: list  # cross: [CLS] a [SEP] b [SEP] (BERT), <s> a </s></s> b </s> (RoBERTa); bi: [CLS] a [SEP]
    token_type_ids: list  # cross: 0 for a and the tokens around it, 1 for b and its [SEP] (all 0 for RoBERTa)
    scores: list
    truncated: list  # True if the pair (or either sentence) was cut to max_len
    b_ids: list = None  # bi: [CLS] b [SEP]
    source: str = None  # a fingerprint of the file and tokenization it came from (load_stsb)

    def __len__(self):
        return len(self.scores)

    def lengths(self):
        """Word pieces per pair: what a batch of it costs."""
        return np.array([len(ids) + (len(self.b_ids[i]) if self.b_ids else 0) for i, ids in enumerate(self.input_ids)])

    def subset(self, indices):
        def pick(rows):
            return None if rows is None else [rows[i] for i in indices]
        return PairData(pick(self.input_ids), pick(self.token_type_ids), pick(self.scores), pick(self.truncated),
                        pick(self.b_ids), self.source)


def encode_pairs(pairs, tokenizer, max_len, kind="cross"):
    """[(a, b, score)] -> PairData.

    cross: too long a pair loses pieces from its longer sentence first, one at
    a time (the tokenizers library's longest_first, transformers' default for
    pairs). bi: each sentence is cut to max_len on its own.
    """
    scores = [s for _, _, s in pairs]
    if kind == "cross":
        encodings = _encode(tokenizer, [(a, b) for a, b, _ in pairs], max_len)
        return PairData([e.ids for e in encodings], [e.type_ids for e in encodings], scores,
                        [bool(e.overflowing) for e in encodings])
    a, b = (_encode(tokenizer, [pair[side] for pair in pairs], max_len) for side in (0, 1))
    return PairData([e.ids for e in a], [e.type_ids for e in a], scores,
                    [bool(x.overflowing or y.overflowing) for x, y in zip(a, b)], [e.ids for e in b])


def collate_pairs(data, indices, pad_id=0, multiple=1):
    """The chosen pairs as a batch for model.PairModel: input_ids, attention_mask and
    token_type_ids (cross), or a_ids, a_mask, b_ids, b_mask (bi); and scores (B,), in 0-5."""
    scores = torch.tensor([data.scores[i] for i in indices], dtype=torch.float32)
    if data.b_ids is None:
        input_ids, attention_mask = pad([data.input_ids[i] for i in indices], pad_id, multiple)
        token_type_ids, _ = pad([data.token_type_ids[i] for i in indices], 0, multiple)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                "scores": scores}
    a_ids, a_mask = pad([data.input_ids[i] for i in indices], pad_id, multiple)
    b_ids, b_mask = pad([data.b_ids[i] for i in indices], pad_id, multiple)
    return {"a_ids": a_ids, "a_mask": a_mask, "b_ids": b_ids, "b_mask": b_mask, "scores": scores}


def byte_level(tokenizer):
    """Does the tokenizer pre-tokenize bytes (RoBERTa), where a leading space is part of a token?"""
    step = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = step.get("pretokenizers", [step]) if step.get("type") == "Sequence" else [step]
    return any(s.get("type") == "ByteLevel" for s in steps)


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


# --- On-disk cache of tokenized files --------------------------------------------

def _pack(rows):
    """Ragged int lists -> (flat array, offsets) for safetensors."""
    offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
    flat = np.fromiter((x for r in rows for x in r), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def _unpack(flat, offsets):
    flat = flat.tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _cache_key(path, tokenizer, max_len):
    h = hashlib.sha256()
    h.update(Path(path).read_bytes())
    h.update(tokenizer.to_str().encode())
    h.update(f"max_len={max_len};format=2".encode())  # 2: byte-level BPE words get their leading space
    return h.hexdigest()[:20]


def save_cache(data, path):
    """Write TaskData as safetensors, atomically (temporary file, then rename)."""
    arrays = {"truncated": np.array(data.truncated, dtype=np.int8)}
    arrays["ids"], arrays["ids_offsets"] = _pack(data.input_ids)
    if data.task == "ag":
        arrays["labels"] = np.array(data.labels, dtype=np.int64)
    else:
        arrays["labels"], _ = _pack(data.labels)  # same offsets as ids
        arrays["word_tags"], arrays["word_offsets"] = _pack([[NER_ID[t] for t in tags] for tags in data.word_tags])
        arrays["first_piece"], _ = _pack(data.first_piece)  # same offsets as word_tags
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"task": data.task}))  # ranks may write at once


def load_cache(path, task):
    arrays = load_file(path)
    truncated = arrays["truncated"].astype(bool).tolist()
    input_ids = _unpack(arrays["ids"], arrays["ids_offsets"])
    if task == "ag":
        return TaskData("ag", input_ids, arrays["labels"].tolist(), truncated)
    tags = [[NER_TAGS[i] for i in row] for row in _unpack(arrays["word_tags"], arrays["word_offsets"])]
    return TaskData("ner", input_ids, _unpack(arrays["labels"], arrays["ids_offsets"]), truncated, tags,
                    _unpack(arrays["first_piece"], arrays["word_offsets"]))


def encode_file(path, task, tokenizer, max_len, cache_dir=None, log=None):
    """Read and tokenize one file, through the cache when cache_dir is given; progress lines go to log.

    The result's `source` fingerprints the file's bytes, the tokenizer and
    max_len (the frozen-backbone features are keyed by it, see features.py).
    """
    read, encode = (read_ag_news, encode_classification) if task == "ag" else (read_conll, encode_ner)
    path, cached = Path(path), None
    key = _cache_key(path, tokenizer, max_len) if path.exists() else None
    if cache_dir is not None and key is not None:
        cached = Path(cache_dir) / f"{path.parent.name}-{path.stem}-{key}.safetensors"
        if cached.exists():
            try:
                return _with_source(load_cache(cached, task), key)
            except (SafetensorError, KeyError) as e:
                print(f"warning: {cached}: unreadable cache ({e}); tokenizing again", file=sys.stderr)
    examples = read(path)  # a missing file raises its error here
    report = Report(f"tokenizing {path.parent.name}/{path.name}", len(examples), log) if log else None
    data = _with_source(encode(examples, tokenizer, max_len, report), key)
    if cached is not None:
        try:
            save_cache(data, cached)
        except OSError as e:  # a read-only data folder, say: run on without a cache
            print(f"warning: cannot write the cache {cached} ({e.strerror}); continuing without it", file=sys.stderr)
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
    """Example indices in batches of similar length, longest first, over a whole split; batch b
    goes to rank b % world_size only. For evaluation and for computing features, where order does
    not matter and padding is waste.

    Longest first, because the first batch then allocates the largest buffers and every later
    batch fits in them. Shortest first, each batch needs slightly larger buffers than any freed
    so far, and the process's heap grew to 12 GB over one pass of MiniLM on 120,000 rows.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[start:start + batch_size].tolist() for b, start in enumerate(range(0, len(lengths), batch_size))
            if b % world_size == rank]


def batches_by_length(data, batch_size, pad_id=0, multiple=1, rank=0, world_size=1):
    """(example indices, collated batch) for this rank's length_batches of one split."""
    for indices in length_batches(data.lengths(), batch_size, rank, world_size):
        yield indices, collate(data, indices, pad_id, multiple)


class MultiTaskSampler:
    """Which examples form each batch, epoch by epoch, for several tasks at once.

    - Every epoch takes n = min(task sizes) examples from each task. The
      larger task walks through shuffled passes of all its examples, n at a
      time, so consecutive epochs see different examples and all are used.
    - Every batch holds one task; the order of the tasks' batches is shuffled.
    - group_window > 0 sorts examples by length inside windows of that many
      batches before cutting batches, so a batch holds similar lengths and
      needs less padding. 0 turns it off.
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
        self.seed = seed
        self.group_window = group_window
        self.rank = rank
        self.world_size = world_size
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


def padding_fraction(batches, lengths):
    """Share of padded positions in [(task, indices)] batches, given per-task example lengths."""
    real = padded = 0
    for task, indices in batches:
        sizes = lengths[task][indices]
        real += int(sizes.sum())
        padded += int(sizes.max()) * len(indices)
    return 1 - real / padded


# --- All splits --------------------------------------------------------------------

AG_VALID_FRACTION = 0.05  # AG News has no validation split: hold out 5% of train (train.py --ag-valid-fraction)


def load_splits(data_dir, tokenizer, max_len, cache_dir=None, splits=("train", "valid", "test"), split_seed=0,
                log=None, ag_valid_fraction=AG_VALID_FRACTION):
    """{"ag": {split: TaskData}, "ner": {split: TaskData}} from the data directory (see download.py).

    The AG validation split is fixed by split_seed, not by a run's --seed,
    so that runs with different seeds are compared on the same examples. A
    larger ag_valid_fraction holds out a superset of a smaller one's rows.
    """
    data_dir = Path(data_dir)
    out = {"ag": {}, "ner": {}}
    if "train" in splits or "valid" in splits:
        path = data_dir / "ag_news" / "train.csv"
        ag_train = encode_file(path, "ag", tokenizer, max_len, cache_dir, log)
        kept, held = split_off(len(ag_train), ag_valid_fraction, split_seed)
        if not len(held) or not len(kept):  # a run would pick its best epoch on no rows at all
            fewest = next(n for n in itertools.count(int(0.5 / min(ag_valid_fraction, 1 - ag_valid_fraction)))
                          if 0 < round(n * ag_valid_fraction) < n)
            raise DataError(f"{path}: {len(ag_train)} rows leave no {'validation' if len(kept) else 'training'} rows "
                            f"({ag_valid_fraction:.0%} of train are held out for validation); give it at least "
                            f"{fewest} rows")
        out["ag"].update(train=ag_train.subset(kept), valid=ag_train.subset(held))
    if "test" in splits:
        out["ag"]["test"] = encode_file(data_dir / "ag_news" / "test.csv", "ag", tokenizer, max_len, cache_dir, log)
    for split in splits:
        out["ner"][split] = encode_file(data_dir / "conll2003" / f"{split}.txt", "ner", tokenizer, max_len,
                                        cache_dir, log)
    for task in out:
        out[task] = {s: out[task][s] for s in splits}
    return out


STSB_FILES = {"train": "sts-train.csv", "valid": "sts-dev.csv", "test": "sts-test.csv"}


def load_stsb(data_dir, tokenizer, max_len, kind):
    """{split: PairData} from DATA/stsb/ for a bi- or cross-encoder (kind); "test" only where its
    file is there. A missing train or dev file is a DataError with the download command."""
    out = {}
    for split, name in STSB_FILES.items():
        path = Path(data_dir) / "stsb" / name
        if not path.exists():
            if split == "test":
                continue
            raise DataError(f"{path}: not found; run `python download.py --only stsb` (or give --data)")
        out[split] = encode_pairs(read_stsb(path), tokenizer, max_len, kind)
        out[split].source = _cache_key(path, tokenizer, max_len)
    return out


def limit_split(data, limit):
    """A fixed random subset of at most `limit` examples (the same whatever a run's --seed is)."""
    if limit is None or len(data) <= limit:
        return data
    return data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[:limit]).tolist())


# --- Command line: a summary of every split ---------------------------------------

def split_summary(data):
    """One summary row: examples, label counts, word pieces per example, share truncated."""
    if data.task == "ag":
        counts = np.bincount(data.labels, minlength=len(AG_CLASSES))
        labels = " ".join(f"{name} {c:,}" for name, c in zip(AG_CLASSES, counts))
    else:
        entities = [tag[2:] for tags in data.word_tags for tag in tags if tag.startswith("B-")]
        words = sum(len(tags) for tags in data.word_tags)
        labels = f"{words:,} words; entities " + " ".join(
            f"{kind} {entities.count(kind):,}" for kind in ("PER", "ORG", "LOC", "MISC"))
    lengths = data.lengths()
    return (f"{len(data):>7,}  {labels:<62}  {lengths.mean():6.1f} {np.percentile(lengths, 95):5.0f} "
            f"{lengths.max():5d}  {sum(data.truncated):,} ({np.mean(data.truncated):.2%})")


def main(argv=None):
    p = argparse.ArgumentParser(description="Read, tokenize and summarize AG News and CoNLL-2003.")
    p.add_argument("--data", default="data", help="data directory written by download.py (default: data)")
    p.add_argument("--model", default="data/bert-base-uncased", help="model folder with the tokenizer")
    p.add_argument("--max-len", type=int, default=128, help="word pieces per example, [CLS] and [SEP] included")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="train,valid,test", help="comma-separated, from train,valid,test")
    p.add_argument("--no-data-cache", action="store_true", help="tokenize again instead of using DATA/.cache")
    args = p.parse_args(argv)
    splits = tuple(args.splits.split(","))
    if not splits or not set(splits) <= {"train", "valid", "test"}:
        p.error(f"argument --splits: expected names from train,valid,test, got {args.splits!r}")
    if args.max_len < 3:
        p.error(f"argument --max-len: must be at least 3, got {args.max_len}")
    if args.batch_size < 1:
        p.error(f"argument --batch-size: must be at least 1, got {args.batch_size}")
    try:
        start = time.perf_counter()
        tokenizer = load_tokenizer(args.model)
        cache_dir = None if args.no_data_cache else Path(args.data) / ".cache"
        data = load_splits(args.data, tokenizer, args.max_len, cache_dir, splits)
        seconds = time.perf_counter() - start
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'split':<11}{'examples':>8}  {'labels':<62}  {'pieces: mean':>12} {'p95':>5} {'max':>5}  truncated")
    for task, by_split in data.items():
        for split, part in by_split.items():
            print(f"{task + ' ' + split:<11} {split_summary(part)}")
    print(f"read and tokenized in {seconds:.1f} s (max_len {args.max_len}, "
          f"{'no cache' if cache_dir is None else f'cache in {cache_dir}'})")
    if "train" in data["ag"]:
        train = {task: by_split["train"] for task, by_split in data.items()}
        lengths = {task: part.lengths() for task, part in train.items()}
        for window in (0, 50):
            sampler = MultiTaskSampler(lengths, args.batch_size, args.seed, group_window=window)
            start = time.perf_counter()
            batches = sampler.epoch(0)
            for task, indices in batches:
                collate(train[task], indices)  # pad id 0: the ids are not used, only the time
            seconds = time.perf_counter() - start
            grouping = "grouped by length in windows of 50 batches" if window else "no length grouping"
            print(f"one training epoch: {sampler.per_task:,} examples per task, {len(batches):,} batches of "
                  f"{args.batch_size}, padding {padding_fraction(batches, lengths):.1%} ({grouping}); "
                  f"sampled and collated in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
