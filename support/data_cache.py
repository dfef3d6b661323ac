"""The data cache: tokenized files kept on disk, so that a later run skips tokenizing them.

data.encode_file reads a dataset file and tokenizes it; with a cache folder
(DATA/.cache unless --no-data-cache) it first looks here, and stores what
it tokenized. A cached file is named after its data file and a key that
hashes everything its token ids and labels depend on: the file's bytes, how
the task reads it (level, columns, labels), the tokenizer and max_len. So
an edited file, another task over the same file, another tokenizer or
another --max-len finds no entry and is tokenized again; nothing is ever
read stale.

    <folder>/<data folder>-<file stem>-<key>.safetensors
        truncated                 (N,) int8     was example i cut at max_len?
        ids, ids_offsets          the token ids of every example, ragged: ids[offsets[i]:offsets[i + 1]]
        labels                    (N,) label ids (sentence level), or tag ids per piece with ids_offsets
        word_tags, word_offsets   word level: each word's gold tag id, ragged per sentence
        first_piece               word level: each word's first piece, with word_offsets
        metadata                  the task, the key, and the sha256 of the arrays

A file is trusted by its contents, not its name: load() compares the key
stored inside with the key asked for, and the arrays with their sha256, as
features.py does for its cache. An entry that fails (copied over another
file's name, damaged, truncated, or written before the key was stored) is a
miss, with one note line: the file is tokenized again and the entry
rewritten. Files are written atomically (under torchrun, every rank may
write the same one at once); a folder that cannot be written is reported,
and the run goes on without it.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from support.runtime import atomic_write, log

FORMAT = 2  # part of every key; 2: byte-level BPE words get their leading space


def key(path, tokenizer, max_len, task=None):
    """What a file's token ids and labels depend on, hashed: its bytes, how the task reads it (its level,
    columns, labels: tasks.Task.reading), the tokenizer, max_len. Two tasks over one file (CoNLL-2003's
    NER and POS tags) never share an entry."""
    h = hashlib.sha256()
    h.update(Path(path).read_bytes())
    if task is not None:  # STS-B's pairs (sentence_pairs.py) have no task of the table
        h.update(json.dumps(task.reading(), sort_keys=True).encode())
    h.update(tokenizer.to_str().encode())
    h.update(f"max_len={max_len};format={FORMAT}".encode())
    return h.hexdigest()[:20]


def _entry(folder, path, key):
    return Path(folder) / f"{path.parent.name}-{path.stem}-{key}.safetensors"


def _pack(rows):
    """Ragged int lists -> (flat array, offsets) for safetensors."""
    offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
    flat = np.fromiter((x for r in rows for x in r), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def _unpack(flat, offsets):
    flat = flat.tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _checksum(arrays):
    """sha256 of the arrays, by name, in name order: what load() checks a file's contents against."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def load(folder, path, key, task):
    """The fields of data.TaskData but its task, for `path` tokenized under `key`, or None: no folder, no
    entry, or an entry whose contents are not those of `key` (with a note). task: its row of the task
    table, whose labels the stored tag ids index."""
    entry = _entry(folder, path, key) if folder is not None and key is not None else None
    if entry is None or not entry.exists():
        return None
    try:
        with safe_open(entry, framework="np") as f:
            stored, arrays = f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
        problem = ("has no stored key (an older cache format)" if "key" not in stored else
                   "holds the tokens of another file, tokenizer or --max-len" if stored["key"] != key else
                   "is damaged (its arrays do not match their checksum)" if stored.get("sha256") != _checksum(arrays)
                   else None)
    except (SafetensorError, OSError) as e:  # a truncated file among them
        problem = f"is unreadable ({(str(e).splitlines() or [type(e).__name__])[0]})"
    if problem:
        log(f"note: {entry}: {problem}; tokenizing again", file=sys.stderr)
        return None
    fields = {"truncated": arrays["truncated"].astype(bool).tolist(),
              "input_ids": _unpack(arrays["ids"], arrays["ids_offsets"])}
    if task.level == "sentence":
        return {**fields, "labels": arrays["labels"].tolist()}
    word_tags = [[task.labels[i] for i in row] for row in _unpack(arrays["word_tags"], arrays["word_offsets"])]
    return {**fields, "labels": _unpack(arrays["labels"], arrays["ids_offsets"]),
            "word_tags": word_tags, "first_piece": _unpack(arrays["first_piece"], arrays["word_offsets"])}


def save(folder, path, key, data):
    """Store data (a data.TaskData) for `path` under `key`, if there is a folder."""
    if folder is None or key is None:
        return
    arrays = {"truncated": np.array(data.truncated, dtype=np.int8)}
    arrays["ids"], arrays["ids_offsets"] = _pack(data.input_ids)
    if data.task.level == "sentence":
        arrays["labels"] = np.array(data.labels, dtype=np.int64)
    else:
        tag_id = {tag: i for i, tag in enumerate(data.task.labels)}
        arrays["labels"], _ = _pack(data.labels)  # same offsets as ids
        arrays["word_tags"], arrays["word_offsets"] = _pack([[tag_id[t] for t in row] for row in data.word_tags])
        arrays["first_piece"], _ = _pack(data.first_piece)  # same offsets as word_tags
    entry = _entry(folder, path, key)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"task": data.task.name, "key": key, "sha256": _checksum(arrays)}  # what load() checks
        atomic_write(entry, lambda tmp: save_file(arrays, tmp, metadata=metadata))
    except OSError as e:  # a read-only data folder, say: run on without a cache
        print(f"warning: cannot write the cache {entry} ({e.strerror}); continuing without it", file=sys.stderr)
