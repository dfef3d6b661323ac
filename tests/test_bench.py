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
    ours = bench.MultiTaskModel(bench.SentenceEncoder(bench.Bert(bench.SHAPES["minilm"])))
    theirs = bench.TransformersModel(bench.SHAPES["minilm"])
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 23_015_437


def test_profile_lists_the_costliest_operators_first(capsys):
    argv = ["--model", str(TINY_PLAIN), "--batch-size", "4", "--seq-len", "16", "--warmup", "1", "--steps", "1",
            "--profile", "2"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("profile of our model, fp32, freeze none, 2 steps:"))
    rows = [line.split() for line in lines[start + 1:] if line.startswith("  ")]
    shares = [float(r[0].rstrip("%")) for r in rows]
    assert 5 <= len(rows) <= 15 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.05
    names = [r[4] for r in rows]
    assert "aten::addmm" in names and not any("#" in n for n in names), names  # no annotations (Optimizer.step#...)
    per_step = [float(r[1]) for r in rows]
    assert per_step == sorted(per_step, reverse=True) and per_step[0] > 0


@pytest.mark.parametrize("flag, compiled", [([], []), (["--compile"], ["MultiTaskModel", "TransformersModel"]),
                                             (["--compile", "ours"], ["MultiTaskModel"])])
def test_compile_flag_compiles_the_models_it_names(monkeypatch, flag, compiled):
    pytest.importorskip("transformers")
    seen = []
    monkeypatch.setattr(bench.torch, "compile", lambda model: seen.append(type(model).__name__) or model)
    argv = ["--model", str(TINY_PLAIN), "--batch-size", "2", "--seq-len", "8", "--warmup", "1", "--steps", "1",
            "--vs-transformers", *flag]
    assert bench.main(argv) == 0
    assert seen == compiled
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile", "theirs"])
