"""scripts/usual_job.py, the usual transformers job that docs/defaults.md compares train.py with (needs transformers)."""

import json
import sys

import pytest
from conftest import FIXTURES, ROOT, TINY_PLAIN

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "scripts"))
import usual_job  # noqa: E402

from data import MultiTaskSampler  # noqa: E402


def run(tmp_path, *extra):
    out = tmp_path / "_".join(extra or ("usual",))
    argv = ["--model", str(TINY_PLAIN), "--data", str(FIXTURES / "data"), "--out", str(out), "--epochs", "2",
            "--max-len", "64", "--batch-size", "4", *extra]
    assert usual_job.main(argv) is None
    return json.loads((out / "summary.json").read_text())


def test_usual_rates_are_flat_for_the_encoder_and_ours_are_train_pys(tmp_path):
    usual = run(tmp_path)["rates"]
    assert {part for part, rate in usual.items() if rate == 5e-5} == {"embeddings", "pooler", "layer.0", "layer.1"}
    assert usual["ag_head"] == usual["ner_head"] == 5e-4
    ours = run(tmp_path, "--rates", "ours")["rates"]  # the tiny model: --lr auto 3e-4, --lr-decay auto 0.729
    assert ours["layer.1"] == pytest.approx(3e-4) and ours["layer.0"] == pytest.approx(3e-4 * 0.729)
    assert ours["embeddings"] == pytest.approx(3e-4 * 0.729 ** 2) and ours["ag_head"] == 1e-3


def test_epochs_are_train_pys_examples_in_random_batches(tmp_path, monkeypatch):
    seen = []
    real = usual_job.to_batch
    monkeypatch.setattr(usual_job, "to_batch", lambda c, ex, task, idx, dev: seen.append((task, list(idx)))
                        or real(c, ex, task, idx, dev))
    summary = run(tmp_path, "--seed", "3")
    assert len(summary["valid"]) == 2 and summary["best_epoch"] in (1, 2)
    sizes = {"ag": [0] * 38, "ner": [0] * 24}  # the fixture's train sizes (40 AG rows less 5% held out)
    first = [(task, list(b)) for task, b in MultiTaskSampler(sizes, 4, 3, group_window=0).epoch(0)]
    assert len(first) == 2 * 6 and seen[:len(first)] == first  # epoch 1's steps come before any evaluation
