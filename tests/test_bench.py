"""bench.py runs and reports consistent numbers (speed itself is measured by hand, not in tests)."""

import json

import pytest
import torch
from conftest import FIXTURES, TINY_PLAIN

import bench
from support.model_folder import load_pretrained


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
    peaks = json.loads(out.read_text())["peak_tflops"]
    assert set(peaks) == {"fp32", "bf16"} and all(p > 0 for p in peaks.values())
    for r in rows:  # the step's FLOP/s, as a share of each measured peak
        flops = bench.train_flops(load_pretrained(TINY_PLAIN).config, 4, 16, r["freeze"] == "backbone")
        assert r["ours"]["tflops"] == pytest.approx(flops / (r["ours"]["ms"] / 1e3) / 1e12)
        assert r["ours"]["of_fp32_peak"] == pytest.approx(r["ours"]["tflops"] / peaks["fp32"])
        assert r["ours"]["mfu"] == pytest.approx(r["ours"]["tflops"] / peaks["bf16"])
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("| precision | freeze | B | S | ms/step") and len(table) == 3 + len(rows)
    assert table[1].endswith("| TFLOP/s | of fp32 peak | of bf16 peak | transformers ms/step | ours / transformers |")


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


@pytest.mark.parametrize("flag, value, low", [("--steps", 0, 1), ("--seq-len", 0, 1), ("--batch-size", 0, 1),
                                              ("--warmup", -1, 0), ("--profile", -1, 0)])
def test_every_number_flag_is_checked_before_anything_runs(capsys, flag, value, low):
    assert bench.main(["--model", str(TINY_PLAIN), flag, str(value), "--device", "cpu"]) == 2
    assert capsys.readouterr() == ("", f"error: argument {flag}: must be at least {low}, got {value}\n")


def test_the_shortest_sequence_and_batch_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--model", str(TINY_PLAIN), "--batch-size", "1", "--seq-len", "1", "--warmup", "0", "--steps", "1",
            "--device", "cpu", "--json", str(out)]
    assert bench.main(argv) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert (row["batch"], row["seq"]) == (1, 1) and row["ours"]["tokens_per_s"] == pytest.approx(1000 / row["ours"]["ms"])
    assert bench.main(["--model", str(TINY_PLAIN), "--seq-len", "65", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: argument --seq-len: 65 is more than the model's 64 positions\n"


def test_every_flag_has_help_and_the_defaults_that_mean_something(capsys):
    flags = [a for a in bench.parser()._actions if a.option_strings != ["-h", "--help"]]
    assert len(flags) == 16 and [a.option_strings for a in flags if not a.help] == []
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps at the terminal's width
    assert "--batch-size BATCH_SIZE examples per step (default: 32)" in text
    assert "--steps STEPS timed steps per model; the table gives their median (default: 10)" in text
    assert "--json JSON also write the results to this file --profile" in text  # no default where there is none
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_trained_model_folder_times_its_encoder_without_a_note(tmp_path, capsys):
    from support.model_folder import load_pretrained, save_trained
    run = tmp_path / "run"
    save_trained(bench.MultiTaskModel(bench.SentenceEncoder(load_pretrained(TINY_PLAIN))), run)
    argv = ["--model", str(run), "--batch-size", "2", "--seq-len", "8", "--warmup", "0", "--steps", "1",
            "--freeze", "none", "backbone", "--device", "cpu"]
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""  # only its encoder's shape matters for speed: no note about the heads
    assert [line.split(" | ")[1] for line in out.splitlines()[3:]] == ["none", "backbone"]


def test_real_lengths_time_the_same_random_batches_padded_and_unpadded(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    conll = FIXTURES / "data" / "conll2003" / "train.txt"
    argv = ["--model", str(TINY_PLAIN), "--lengths", str(conll), "--batch-size", "4", "--warmup", "1", "--steps",
            "3", "--vs-transformers", "--json", str(out), "--device", "cpu"]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["padded random", "grouped", "unpadded random",
                                            "transformers, padded random"]
    by = {r["setting"]: r for r in rows}
    # The same random batches, so the same padding share; grouping leaves less of it.
    assert by["padded random"]["padding"] == by["unpadded random"]["padding"] == by[
        "transformers, padded random"]["padding"] > by["grouped"]["padding"] >= 0
    random = bench.real_batches(bench.parse_args(argv + ["--seq-len", "64"]), load_pretrained(TINY_PLAIN).config,
                                torch.device("cpu"))["random"][1:]
    tokens = sum(int(mask.sum()) for _, _, mask, _ in random)
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(tokens / (3 * r["ms"] / 1e3)) or r["setting"] == "grouped"
        assert r["vs_padded_random"] == pytest.approx(r["tokens_per_s"] / by["padded random"]["tokens_per_s"])
    assert {task for task, *_ in random} == {"ner"}
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("| precision | freeze | batches | real tokens/s | padding") and len(table) == 7


def test_real_lengths_need_a_tokenizer_and_a_readable_file(tmp_path, capsys):
    assert bench.main(["--config", "minilm", "--lengths", "x.txt", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ("error: argument --lengths: needs a tokenizer: give --model, or "
                                               "--tokenizer with --config")
    assert bench.main(["--model", str(TINY_PLAIN), "--lengths", str(tmp_path / "none.txt"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'none.txt'}:")
