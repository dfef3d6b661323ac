"""A frozen backbone's features: computed once per example a run reads, kept on the device, saved for later runs.

With the whole backbone frozen for the whole run (freeze.Plan.backbone_fixed),
the encoder is a fixed function in eval mode: what a head reads from it
(MultiTaskModel.features: the pooled vector of a sentence-level task, the
token states of a word-level one) cannot change. So the run computes it once per example, and the heads
train and evaluate on it (train.py's loop and evaluate read FeatureStore.batch).

Which examples: the training rows that the planned epochs draw (the sampler
depends only on the seed and the epoch: MultiTaskSampler.reads), and every
validation and test row; nothing else. Under torchrun each rank encodes only
the rows it reads itself (its shares of the training batches, its
evaluation batches): no collectives but one (the memory check), at the price
of encoding twice a row that two ranks read in different epochs. Every rank
may write chunks to the folder below, each file atomically.

On disk, in the data cache folder (DATA/.cache/features/), the features
outlive the run:

    features/<key>/<chunk>.safetensors
        rows      (N,)         the examples' row numbers in their data file (TaskData.rows)
        pieces    (N,)         their word-piece counts, checked against the data when read
        offsets   (N + 1,)     example j is features[offsets[j]:offsets[j + 1]]: 1 vector, or T (word level)
        features  (sum T, H)   in the run's precision
        metadata  the key, and the sha256 of the three tensors

<key> hashes everything that changes a feature: the backbone's config and
weights, the tokenized file (its bytes, the tokenizer and max_len:
TaskData.source), the task, the pooling (sentence level only), the precision and the
device type. A later run loads what it finds under its keys and encodes only
the rows still missing: another seed, more epochs, other head flags. A chunk
whose checksum, key or word-piece counts do not match is reported, deleted,
and its rows are encoded again. Chunks are written atomically (never half a file), every
CHUNK_MB or CHUNK_SECONDS, so an interrupted build keeps most of its work.
--feature-cache-limit-mb caps the folder; the least recently used keys go first.
"""

import hashlib
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from support import distributed
from support.checkpoint import weights_hash
from data import length_batches, pad
from support.runtime import Report, atomic_write, duration, log, plural

FORMAT = 2  # bump when what a feature is, or the file layout, changes
CHUNK_MB = 256
CHUNK_SECONDS = 60


def feature_key(weights, part, pool, dtype, device):
    sentence = part.task.level == "sentence"  # a pooled vector, which depends on the pooling too
    fields = [f"format={FORMAT}", weights, f"data={part.source}", f"task={part.task.name}", f"dtype={dtype}",
              f"device={device.type}"] + ([f"pool={pool}"] if sentence else [])
    return hashlib.sha256(";".join(fields).encode()).hexdigest()[:24]


def rows_wanted(splits, train_rows, evaluated, batch_size, place):
    """What FeatureStore.build takes: {(task, split): (TaskData, example indices)}. The training rows
    given ({task: rows}, MultiTaskSampler.reads), and in each evaluated split the rows of this rank's
    evaluation batches, cut as evaluate cuts them (data.length_batches)."""
    wanted = {(task, "train"): (splits[task]["train"], rows) for task, rows in train_rows.items()}
    for split in evaluated:
        for task, by in splits.items():
            batches = length_batches(by[split].lengths(), batch_size, place.rank, place.world_size)
            wanted[(task, split)] = (by[split], [i for batch in batches for i in batch])
    return wanted


class Features:
    """One split of one task: example index -> what its head reads, a tensor on the device."""

    def __init__(self, level):
        self.level, self.rows = level, {}

    def batch(self, indices, width):
        """Stack (sentence level) or zero-pad to width (word level) a batch's features; the loss never reads
        padding."""
        rows = [self.rows[i] for i in indices]
        if self.level == "sentence":
            return torch.stack(rows)  # (B, H)
        out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])  # (B, T, H)
        for r, x in enumerate(rows):
            out[r, :len(x)] = x
        return out


# --- On disk ------------------------------------------------------------------------

def _checksum(tensors):
    h = hashlib.sha256()
    for name in ("rows", "pieces", "offsets", "features"):
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class DiskCache:
    """The features folder: chunks under each key, checked when read, capped in size."""

    def __init__(self, folder, limit_mb):
        self.folder, self.limit_mb = Path(folder), limit_mb
        self.in_use = set()  # the keys of this run (FeatureStore.build sets them): never evicted by it
        self.stored_bytes = 0
        self.writable = True

    def load(self, key, wanted):
        """{row: features (T, H) on the CPU} for the wanted rows ({row: word pieces}) stored under key."""
        found, folder = {}, self.folder / key
        if not folder.is_dir():
            return found
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(path, "pt") as f:
                    metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
                problem = ("belongs to another key" if metadata.get("key") != key else
                           "checksum mismatch" if metadata.get("sha256") != _checksum(tensors) else None)
            except FileNotFoundError:  # removed meanwhile by another run's eviction
                continue
            except (SafetensorError, OSError, KeyError, RuntimeError) as e:
                problem = f"unreadable ({(str(e).splitlines() or [type(e).__name__])[0]})"
            rows, pieces = ([], []) if problem else (tensors["rows"].tolist(), tensors["pieces"].tolist())
            if any(row in wanted and wanted[row] != n for row, n in zip(rows, pieces)):
                problem = "its rows do not match the data's word pieces"
            if problem:
                log(f"warning: {path}: {problem}; deleted, its features are encoded again", flush=True)
                self._remove(path)
                continue
            offsets = tensors["offsets"].tolist()
            for j, row in enumerate(rows):
                if row in wanted and row not in found:
                    found[row] = tensors["features"][offsets[j]:offsets[j + 1]].clone()
        self._tidy(folder)
        return found

    def _remove(self, path):
        try:
            path.unlink(missing_ok=True)
        except OSError as e:  # a read-only cache shared with others: use what is sound, leave the rest
            log(f"warning: cannot delete {path} ({e.strerror})")

    def _tidy(self, folder):
        """Mark the key as just used (for eviction), and remove what killed writers left over an hour ago."""
        try:
            os.utime(folder)
            for tmp in folder.glob("*.tmp"):  # atomic_write's temporary files: never read
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink(missing_ok=True)
        except OSError:  # a read-only cache: reading it is all this run needs
            pass

    def save(self, key, rows, pieces, features):
        """One chunk of new features (rows: row numbers; pieces: their word-piece counts; features:
        (T, H) CPU tensors), if there is room."""
        tensors = {"rows": torch.tensor(rows, dtype=torch.int64), "pieces": torch.tensor(pieces, dtype=torch.int64),
                   "offsets": torch.tensor(np.cumsum([0] + [len(x) for x in features]), dtype=torch.int64),
                   "features": torch.cat(features)}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if not self.writable or not self._make_room(size):
            return
        path = self.folder / key / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self.stored_bytes}.safetensors"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: save_file(tensors, tmp, {"key": key, "sha256": _checksum(tensors)}))
        except (OSError, SafetensorError) as e:  # a full disk or read-only folder: run on without it
            log(f"warning: cannot write {path} ({e}); new features are not stored", flush=True)
            self.writable = False
            return
        self.stored_bytes += size

    def usage(self):
        """{key folder: bytes}, for every key."""
        sizes = {}
        for folder in self.folder.iterdir() if self.folder.is_dir() else ():
            try:
                sizes[folder] = sum(f.stat().st_size for f in folder.iterdir())
            except (FileNotFoundError, NotADirectoryError):  # evicted meanwhile, or not a key
                pass
        return sizes

    def _make_room(self, size):
        """Delete the least recently used keys (never this run's) until size more bytes fit the limit."""
        sizes = self.usage()
        total = sum(sizes.values())
        for folder in sorted(sizes, key=lambda f: f.stat().st_mtime if f.exists() else 0):
            if total + size <= self.limit_mb * 2**20:
                break
            if folder.name not in self.in_use:
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    total -= sizes[folder]
                    log(f"feature cache: removed {folder} ({sizes[folder] / 2**20:,.0f} MB, least recently used)")
        if total + size > self.limit_mb * 2**20:
            log(f"feature cache: {self.folder} would pass --feature-cache-limit-mb {self.limit_mb}; "
                     "new features are not stored", flush=True)
            self.writable = False
            return False
        return True


# --- Building the store -------------------------------------------------------------

class FeatureStore:
    """The features a run reads, by (task, split); build() makes it."""

    def __init__(self, splits, stats):
        self.splits = splits  # (task, split) -> Features
        self.stats = stats  # what build() did, for the log and summary.json

    def of(self, split):
        """{task: Features} of one split, what evaluate takes."""
        return {task: f for (task, s), f in self.splits.items() if s == split}

    def batch(self, split, task, indices, width):
        """The stored features of a batch of examples of (split, task), as Features.batch gives them."""
        return self.splits[(task, split)].batch(indices, width)

    @classmethod
    @torch.no_grad()
    def build(cls, model, wanted, place, batching, memory_limit_mb, cache=None):
        """Features for wanted = {(task, split): (TaskData, example indices)}, from the disk cache
        (a DiskCache, or None) and the encoder, in batches as `batching` says (data.Batching). None,
        with a log line, if they would pass memory_limit_mb on any rank (all ranks decide alike)."""
        start = time.perf_counter()
        dtype = place.amp_dtype or torch.float32
        weights = weights_hash(model)
        # Every example, once: (key, row) -> its token ids, wherever several splits share a file's rows.
        unique, where = {}, {}
        for (task, split), (part, indices) in wanted.items():
            key = feature_key(weights, part, model.encoder.pool, dtype, place.device)
            for i in indices:
                unique.setdefault((key, part.rows[i]), (part.task, part.input_ids[i]))
                where.setdefault((key, part.rows[i]), []).append(((task, split), i))
        width = model.bert.config.hidden_size * torch.finfo(dtype).bits // 8
        need = sum(1 if task.level == "sentence" else len(ids) for task, ids in unique.values()) * width / 2**20
        need = distributed.agree([math.ceil(need)], place)[0]  # whole MB, the largest over ranks
        if need > memory_limit_mb:
            log(f"frozen-backbone features: would need {need:,.0f} MB, over --feature-store-limit-mb "
                f"{memory_limit_mb}; the steps and evaluations run the backbone instead")
            return None
        found = {}
        if cache is not None:
            by_key = {}  # key -> {row: its word pieces}, what DiskCache.load checks
            for (key, row), (_, ids) in unique.items():
                by_key.setdefault(key, {})[row] = len(ids)
            cache.in_use = set(by_key)
            for key, rows in by_key.items():
                found.update(((key, row), x) for row, x in cache.load(key, rows).items())
        missing = [item for item in unique if item not in found]
        counts = ", ".join(f"{t} {s} {len(i):,}" for (t, s), (_, i) in wanted.items())
        log(f"frozen-backbone features: {plural(len(unique), 'example')} ({counts}); {len(found):,} found on disk, "
            f"{len(missing):,} to encode", flush=True)
        model.eval()
        encoded = _encode(model, missing, unique, place, batching, cache)
        splits = {name: Features(part.task.level) for name, (part, _) in wanted.items()}
        for item, x in {**found, **encoded}.items():
            x = x.to(place.device, dtype)
            for name, i in where[item]:
                splits[name].rows[i] = x[0] if splits[name].level == "sentence" else x
        seconds = time.perf_counter() - start
        stats = {"examples": len(unique), "reused": len(found), "encoded": len(missing), "memory_mb": round(need, 1),
                 "seconds": round(seconds, 1), "cache": None if cache is None else str(cache.folder),
                 "stored_mb": 0.0 if cache is None else round(cache.stored_bytes / 2**20, 1)}
        log(f"frozen-backbone features: ready in {duration(seconds)}, {need:,.0f} MB on {place.device}; "
            "the steps and evaluations run only the heads")
        if cache is not None:
            held = sum(cache.usage().values()) / 2**20
            log(f"feature cache: stored {stats['stored_mb']:,.0f} MB of new features in {cache.folder}, which holds "
                f"{held:,.0f} MB (--feature-cache-limit-mb {cache.limit_mb})")
        return cls(splits, stats)


def _encode(model, missing, unique, place, batching, cache):
    """Run the encoder over the missing (key, row) items, in batches of similar length, one task per
    batch; saves them to the cache every CHUNK_MB. Returns {item: features (T, H)}."""
    out, pending, pending_bytes, last_save = {}, {}, 0, time.perf_counter()
    dtype = place.amp_dtype or torch.float32
    report = Report("encoding features", len(missing), total_cost=sum(len(unique[item][1]) for item in missing))
    for task in {task.name: task for task, _ in unique.values()}.values():  # one task per batch
        items = [item for item in missing if unique[item][0].name == task.name]
        batches = length_batches([len(unique[item][1]) for item in items], batching.size)  # longest first
        for b, indices in enumerate(batches):
            batch = [items[i] for i in indices]
            rows = [unique[item][1] for item in batch]
            input_ids, attention_mask = (t.to(place.device) for t in pad(rows, batching.pad_id, batching.multiple))
            with place.autocast():
                features = model.features(input_ids, attention_mask, task.name).to(dtype)
            host = features.cpu() if cache is not None else None  # one copy per batch, not one per row
            for r, (item, ids) in enumerate(zip(batch, rows)):  # clone: a slice would keep the whole batch alive
                keep = slice(r, r + 1) if task.level == "sentence" else (r, slice(0, len(ids)))
                out[item] = features[keep].clone()
                if cache is not None:  # on the CPU, host is features: no second copy
                    saved = out[item] if host is features else host[keep].clone()
                    pending.setdefault(item[0], []).append((item[1], len(ids), saved))
                    pending_bytes += out[item].numel() * out[item].element_size()
            report.update(len(batch), cost=sum(map(len, rows)))
            if pending and (pending_bytes >= CHUNK_MB * 2**20 or time.perf_counter() - last_save >= CHUNK_SECONDS
                            or b + 1 == len(batches)):
                for key, done in pending.items():
                    row_numbers, pieces, tensors = zip(*done)
                    cache.save(key, list(row_numbers), list(pieces), list(tensors))
                pending, pending_bytes, last_save = {}, 0, time.perf_counter()
    if missing:
        log(f"encoded {plural(len(missing), 'example')} in {duration(report.seconds())} "
            f"({len(missing) / report.seconds():,.0f} examples/s)")
    return out
