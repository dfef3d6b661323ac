"""scripts/plot_runs.py: two runs in one picture, drawn from what the runs wrote."""

import json
import struct
import sys

import pytest
from conftest import FIXTURES, ROOT, TINY_PLAIN

import pairs
import train

sys.path.insert(0, str(ROOT / "scripts"))
import plot_runs  # noqa: E402

DATA = FIXTURES / "data"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny train.py runs (another rate each) and a bi- and a cross-encoder of pairs.py."""
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", "1e-3"), ("b", "1e-4")):
        assert train.main(["--model", str(TINY_PLAIN), "--data", str(DATA), "--out", str(root / name),
                           "--max-len", "64", "--batch-size", "4", "--epochs", "2", "--no-data-cache",
                           "--log-every", "5", "--lr", lr]) == 0
    for encoder in ("bi", "cross"):
        assert pairs.main(["--encoder", encoder, "--model", str(TINY_PLAIN), "--data", str(DATA), "--out",
                           str(root / encoder), "--max-len", "32", "--batch-size", "4", "--epochs", "1"]) == 0
    return root


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def test_two_runs_on_one_picture(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="pip install -r requirements-dev.txt")
    out = tmp_path / "curves.png"
    assert plot_runs.main([str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    assert png_size(out) == (1320, 660)  # 12 x 6 inches at 110 dots per inch
    import matplotlib.pyplot as plt
    figure = plot_runs.curves([plot_runs.read_run(runs / name) for name in "ab"], ["a", "b"], plt)
    losses, scores = figure.axes
    assert [line.get_label() for line in losses.lines] == ["a ag", "a ner", "b ag", "b ner"]
    records = [json.loads(line) for line in (runs / "a" / "metrics.jsonl").read_text().splitlines()]
    rows = [row for record in records for row in record["interval_losses"]]
    assert losses.lines[0].get_xydata().tolist() == [[row["step"], row["ag"]] for row in rows]
    assert scores.lines[0].get_label() == "a AG accuracy"
    assert scores.lines[0].get_xydata().tolist() == [[r["step"], r["ag_accuracy"]] for r in records]


def test_cost_puts_one_point_per_run_against_its_cost(runs, tmp_path):
    pytest.importorskip("matplotlib", reason="pip install -r requirements-dev.txt")
    out = tmp_path / "cost.png"
    assert plot_runs.main([str(runs / "bi"), str(runs / "cross"), "--view", "cost", "--x", "params,search_s",
                           "--out", str(out), "--queries", "10", "--documents", "1000"]) == 0
    assert png_size(out) == (1320, 495)
    bi, cross = (json.loads((runs / name / "summary.json").read_text()) for name in ("bi", "cross"))
    assert plot_runs.x_value(bi, "search_s", "bi", 10, 1000) == 1010 / bi["inference"]["sentences_per_s"]
    assert plot_runs.x_value(cross, "search_s", "cross", 10, 1000) == 10_000 / cross["inference"]["pairs_per_s"]
    assert plot_runs.x_value(bi, "params", "bi", 10, 1000) == bi["parameters"]["trainable"]
    assert plot_runs.x_value(bi, "total_s", "bi", 10, 1000) == bi["timings_s"]["total"]
    records, summary = plot_runs.read_run(runs / "a")
    best = next(r for r in records if r["epoch"] == summary["best_epoch"])
    assert plot_runs.best_scores(records, summary, "a") == {"ag_accuracy": best["ag_accuracy"],
                                                            "ner_f1": best["ner_f1"]}


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    assert plot_runs.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}: neither metrics.jsonl nor summary.json; give folders "
                                       "that train.py or pairs.py wrote\n")
    assert plot_runs.main([str(runs / "a"), "--view", "cost", "--x", "speed", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "error: argument --x: speed is not one of params, train_s, total_s, search_s\n"
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_it_says_what_to_install(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib then raises ImportError
    assert plot_runs.main([str(runs / "a"), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "error: matplotlib is not installed: pip install -r requirements-dev.txt\n"


def test_training_never_imports_matplotlib():
    """matplotlib is a dev requirement: no module of the project imports it, only this script does."""
    for path in ROOT.glob("*.py"):
        assert "matplotlib" not in path.read_text(), path.name
    assert "matplotlib" not in (ROOT / "requirements.txt").read_text()
    assert "matplotlib" in (ROOT / "requirements-dev.txt").read_text()
