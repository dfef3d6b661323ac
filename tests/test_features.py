"""A frozen backbone's features (features.py): only the rows a run reads, reused across runs, checked on disk."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, TINY_PLAIN
from safetensors.torch import load_file, save_file

from support import features
import train
from data import MultiTaskSampler, load_splits, load_tokenizer
from support.runtime import Report

TASK_LOSS = train.task_loss


@pytest.fixture
def data(tmp_path):
    """A copy of the fixture data, so that its .cache (tokens and features) belongs to this test."""
    shutil.copytree(FIXTURES / "data", tmp_path / "data")
    return tmp_path / "data"


def run(out, data, *extra, model=TINY_PLAIN):
    """train.main with a frozen backbone; returns (summary.json or None, the losses of every step)."""
    losses = []

    def recording(logits, labels, task, normalizer=None):
        loss = TASK_LOSS(logits, labels, task, normalizer)
        losses.append(loss.item())
        return loss

    train.task_loss = recording
    try:
        argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--max-len", "64", "--batch-size", "4",
                "--log-every", "5", "--freeze", "backbone", "--lr", "1e-3", "--head-lr", "1e-2", *map(str, extra)]
        assert train.main(argv) == 0
    finally:
        train.task_loss = TASK_LOSS
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None, losses


def same_scores(a, b):
    keys = ("ag_accuracy", "ner_f1", "ner_precision", "ner_recall")
    return all(a[k] == pytest.approx(b[k], abs=1e-9) for k in keys)


def chunk_files(data):
    return sorted((data / ".cache" / "features").glob("*/*.safetensors"))


def rows_read(data, seed, epochs):
    """The training rows a run with this seed reads (the sampler is a function of seed and epoch)."""
    splits = load_splits(data, load_tokenizer(TINY_PLAIN), 64, splits=("train",))
    lengths = {task: by["train"].lengths() for task, by in splits.items()}
    return MultiTaskSampler(lengths, 4, seed).reads(0, 0, epochs)


def test_cold_warm_and_no_store_runs_agree_and_warm_encodes_nothing(tmp_path, data):
    cold, cold_losses = run(tmp_path / "cold", data, "--epochs", 2)
    # AG: 38 train rows (2 epochs of 24 read them all), 2 valid, 12 test; CoNLL: 24 train, 8 valid, 8 test.
    assert cold["feature_store"]["examples"] == 38 + 2 + 12 + 24 + 8 + 8
    assert cold["feature_store"]["reused"] == 0 and cold["feature_store"]["encoded"] == 92
    assert cold["feature_store"]["stored_mb"] > 0 and len(chunk_files(data)) == 5  # one key per data file
    warm, warm_losses = run(tmp_path / "warm", data, "--epochs", 2)
    assert warm["feature_store"]["reused"] == 92 and warm["feature_store"]["encoded"] == 0
    assert warm_losses == cold_losses and same_scores(warm, cold)
    plain, plain_losses = run(tmp_path / "plain", data, "--epochs", 2, "--no-feature-store")
    assert plain["feature_store"] is None
    assert len(plain_losses) == len(cold_losses) == 24
    assert max(abs(a - b) for a, b in zip(plain_losses, cold_losses)) <= 1e-5 and same_scores(plain, cold)


def test_a_new_seed_encodes_only_the_rows_it_lacks(tmp_path, data):
    first, _ = run(tmp_path / "seed0", data, "--epochs", 1, "--seed", 0)
    second, losses = run(tmp_path / "seed1", data, "--epochs", 1, "--seed", 1)
    seen, wanted = rows_read(data, 0, 1)["ag"], rows_read(data, 1, 1)["ag"]
    new = set(wanted) - set(seen)
    assert 0 < len(new) < len(wanted)  # the test means something only if the seeds overlap in part
    assert second["feature_store"]["encoded"] == len(new)
    assert second["feature_store"]["reused"] == second["feature_store"]["examples"] - len(new)
    cold, cold_losses = run(tmp_path / "seed1-cold", data, "--epochs", 1, "--seed", 1, "--feature-cache-limit-mb", 0)
    assert cold["feature_store"]["encoded"] == cold["feature_store"]["examples"] and cold["feature_store"]["cache"] is None
    assert max(abs(a - b) for a, b in zip(losses, cold_losses)) <= 1e-6 and same_scores(second, cold)


@pytest.mark.parametrize("damage", ["flipped byte", "cut short", "another key"])
def test_a_damaged_feature_file_is_deleted_and_encoded_again(tmp_path, data, capsys, damage):
    first, first_losses = run(tmp_path / "first", data, "--epochs", 1)
    path = max(chunk_files(data), key=lambda p: p.stat().st_size)  # the CoNLL train states
    n_rows = len(load_file(path)["rows"])
    raw = bytearray(path.read_bytes())
    if damage == "flipped byte":
        raw[-3] ^= 0x40
        path.write_bytes(raw)
    elif damage == "cut short":
        path.write_bytes(raw[:len(raw) // 2])
    else:  # a sound file of another key, put in this key's folder
        shutil.copy(next(p for p in chunk_files(data) if p.parent != path.parent), path)
    capsys.readouterr()
    second, losses = run(tmp_path / "second", data, "--epochs", 1)
    message = {"flipped byte": "checksum mismatch", "cut short": "unreadable", "another key": "belongs to another key"}
    assert f"warning: {path}: {message[damage]}" in capsys.readouterr().out
    assert second["feature_store"]["encoded"] == n_rows
    assert losses == pytest.approx(first_losses, abs=1e-6) and same_scores(first, second)  # other batches: rounding


def test_a_changed_model_reuses_nothing(tmp_path, data):
    run(tmp_path / "first", data, "--epochs", 1)
    model = tmp_path / "model"
    shutil.copytree(TINY_PLAIN, model)
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("layer.1.output.dense.bias"))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, model / "model.safetensors")
    changed, _ = run(tmp_path / "changed", data, "--epochs", 1, model=model)
    assert changed["feature_store"]["reused"] == 0
    assert changed["feature_store"]["encoded"] == changed["feature_store"]["examples"]
    # The pooling is part of the key for AG only: the CoNLL token states are shared.
    other_pool, _ = run(tmp_path / "pool", data, "--epochs", 1, "--pool", "max")
    ner = 24 + 8 + 8
    assert other_pool["feature_store"]["reused"] == ner


def test_resume_encodes_only_the_epochs_still_to_run(tmp_path, data):
    straight, straight_losses = run(tmp_path / "straight", data, "--epochs", 3, "--feature-cache-limit-mb", 0)
    out = tmp_path / "stopped"
    summary, first_losses = run(out, data, "--epochs", 3, "--stop-after", 1)
    assert summary is None  # stopped before the test pass
    resumed, resumed_losses = run(out, data, "--epochs", 3, "--resume")
    assert first_losses + resumed_losses == pytest.approx(straight_losses, abs=1e-6)
    assert same_scores(resumed, straight)
    fresh = set(rows_read(data, 0, 3)["ag"]) - set(rows_read(data, 0, 1)["ag"])  # CoNLL: all 24 read in epoch 1
    # ... and the 12 + 8 test rows, which the first invocation, ending at --stop-after, had no use for
    assert 0 < len(fresh) and resumed["feature_store"]["encoded"] == len(fresh) + 12 + 8
    # --stop-after N trains N epochs per invocation: repeating the same command goes one epoch further each time.
    run(tmp_path / "again", data, "--epochs", 3, "--stop-after", 1)
    again, _ = run(tmp_path / "again", data, "--epochs", 3, "--stop-after", 1, "--resume")
    assert again is None and len((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()) == 2
    again, _ = run(tmp_path / "again", data, "--epochs", 3, "--stop-after", 1, "--resume")
    assert same_scores(again, straight)


def test_the_disk_cap_evicts_the_least_recently_used_key_and_never_the_runs_own(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(features, "log", lambda *a, **k: lines.append(a[0]))
    cache = features.DiskCache(tmp_path / "features", 0.01)  # about 10 kB
    vectors = [torch.ones(1, 32) * i for i in range(20)]  # 20 x 128 bytes
    cache.in_use = {"old", "new"}
    cache.save("old", list(range(20)), [5] * 20, vectors)
    cache.in_use = {"new"}
    assert sorted(cache.load("old", {3: 5, 7: 5})) == [3, 7] and torch.equal(cache.load("old", {3: 5})[3], vectors[3])
    cache.save("new", list(range(60)), [5] * 60, vectors * 3)  # 8.6 kB: only fits without "old"
    assert not (tmp_path / "features" / "old").exists() and any("removed" in line for line in lines)
    assert sorted(cache.load("new", dict.fromkeys(range(60), 5))) == list(range(60))
    cache.save("new", list(range(60, 120)), [5] * 60, vectors * 3)  # would pass the cap, and "new" is in use
    assert cache.writable is False and "would pass --feature-cache-limit-mb 0.01" in lines[-1]
    assert sorted(cache.load("new", dict.fromkeys(range(200), 5))) == list(range(60))
    # rows whose word-piece counts differ from the data's are not these rows' features: the chunk goes
    assert cache.load("new", {3: 6}) == {} and "do not match the data's word pieces" in lines[-1]
    assert cache.load("new", {3: 5}) == {}


def test_report_prints_rate_and_eta_every_interval(monkeypatch):
    clock = iter([0.0, 4.0, 10.0, 15.0, 21.0])
    monkeypatch.setattr("support.runtime.time.perf_counter", lambda: next(clock))
    lines = []
    monkeypatch.setattr("support.runtime.log", lambda line, **_: lines.append(line))
    report = Report("encoding features", 100, total_cost=1000)
    report.update(10, cost=50)  # t=4: too soon
    report.update(20, cost=200)  # t=10: 250 of 1000 cost in 10 s -> 30 s left
    report.update(10, cost=50)  # t=15: 5 s after the last line
    report.update(10, cost=200)  # t=21: 500 of 1000 in 21 s -> 21 s left
    assert lines == ["encoding features: 30/100 examples (30%) | 3 examples/s | ETA 0m30s",
                     "encoding features: 50/100 examples (50%) | 2 examples/s | ETA 0m21s"]
