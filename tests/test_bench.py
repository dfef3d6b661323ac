"""bench.py runs and reports consistent numbers (speed itself is measured by hand, not in tests)."""

import json

import pytest
from conftest import TINY_PLAIN

import bench


def test_bench_reports_every_setting_and_the_ratio(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    argv = ["--model", str(TINY_PLAIN), "--batch-size", "4", "--seq-len", "16", "--freeze", "none", "backbone",
            "--precision", "fp32", "bf16", "--warmup", "1", "--steps", "2", "--vs-transformers", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["freeze"]) for r in rows] == [("fp32", "none"), ("fp32", "backbone"),
                                                             ("bf16", "none"), ("bf16", "backbone")]
    for r in rows:
        ours, theirs = r["ours"], r["transformers"]
        assert r["ratio"] == pytest.approx(ours["ms"] / theirs["ms"])
        assert ours["samples_per_s"] == pytest.approx(4000 / ours["ms"])
        assert ours["tokens_per_s"] == pytest.approx(16 * ours["samples_per_s"])
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("| precision | freeze | B | S | ms/step") and len(table) == 3 + len(rows)


def test_bench_refuses_gpu_only_precisions_on_the_cpu(capsys):
    assert bench.main(["--config", "minilm", "--precision", "fp16", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: argument --precision: fp16 needs a CUDA GPU\n"


def test_transformers_twin_has_the_same_shape():
    pytest.importorskip("transformers")
    ours = bench.MultiTaskModel(bench.Bert(bench.SHAPES["minilm"]))
    theirs = bench.TransformersModel(bench.SHAPES["minilm"])
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 23_015_437
