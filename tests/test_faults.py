"""train.py and pairs.py under faults a careful user can cause: an --out that holds something, a run that
diverges, a resume from the folder alone, flags that would do nothing. Each ends in one line and exit
status 2, or continues as the user meant; nothing that was there is lost, and no JSON holds NaN."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_PLAIN

from support import checkpoint
import data as data_module
from support import features
import pairs
from support import run_folder
from support import step_log
import train
from support.checkpoint import Progress
from support.runtime import Diverged, Place, optimizer_step

DATA = FIXTURES / "data"
TASK_LOSS = train.task_loss
OPTIMIZER_STEP = optimizer_step


def flags(out, *extra, model=TINY_PLAIN):
    return ["--model", str(model), "--data", str(DATA), "--out", str(out), "--max-len", "32",
            "--batch-size", "4", "--no-data-cache", "--log-every", "5", *map(str, extra)]


def pair_flags(out, encoder, *extra, model=TINY_PLAIN):
    return ["--encoder", encoder, "--model", str(model), "--data", str(DATA), "--out", str(out),
            "--max-len", "32", "--batch-size", "4", *map(str, extra)]


def sha256_of_folder(folder):
    """Every file's name and bytes, so that any change, addition or removal shows (of a run's .lock, which
    holds the pid of the last process to hold it, only the name)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file() and path.name != ".lock":
            h.update(path.read_bytes())
    return h.hexdigest()


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as standard parsers do."""
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def assert_all_json_is_strict(folder):
    for path in Path(folder).rglob("*.json*"):
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            strict_json(line)


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


# --- An --out that holds something is refused, and nothing in it changes ---------------------------

@pytest.mark.parametrize("script", ["train", "pairs"])
def test_out_that_holds_the_pretrained_model_is_refused(tmp_path, capsys, script):
    model = tmp_path / "bert"
    shutil.copytree(TINY_PLAIN, model)
    before = sha256_of_folder(model)
    argv = flags(model, model=model) if script == "train" else pair_flags(model, "bi", model=model)
    assert (train if script == "train" else pairs).main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: argument --out: {model} holds a model (config.json, model.safetensors, ")
    assert line.endswith("a new run needs a new or empty folder: choose another --out")
    assert sha256_of_folder(model) == before  # not even a .lock was left in it


def test_a_finished_run_without_its_checkpoint_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1)) == 0
    before = sha256_of_folder(out)
    capsys.readouterr()
    assert train.main(flags(out, "--epochs", 1)) == 2  # with its checkpoint: finished, not one to continue
    assert one_error_line(capsys).startswith(f"error: argument --out: {out} holds a finished run (checkpoint/, ")
    assert train.main(flags(out, "--epochs", 1, "--resume")) == 2
    assert one_error_line(capsys) == (f"error: argument --resume: {out} holds a finished run (summary.json): there "
                                      "is nothing left to train")
    assert sha256_of_folder(out) == before
    shutil.rmtree(out / "checkpoint")  # to save space, say
    before = sha256_of_folder(out)
    capsys.readouterr()
    assert train.main(flags(out, "--epochs", 1)) == 2
    assert one_error_line(capsys).startswith(f"error: argument --out: {out} holds a finished run (config.json, ")
    assert sha256_of_folder(out) == before


def test_a_folder_of_other_files_or_a_file_is_refused_and_an_empty_one_taken(tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me\n")
    assert train.main(flags(other, "--epochs", 1)) == 2
    assert one_error_line(capsys) == (f"error: argument --out: {other} holds other files (todo.txt); a new run "
                                      "needs a new or empty folder: choose another --out")
    assert [p.name for p in other.iterdir()] == ["todo.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert train.main(flags(a_file, "--epochs", 1)) == 2
    assert one_error_line(capsys) == f"error: argument --out: {a_file} is a file, not a folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".lock").write_text("pid 1 on a host that crashed\n")  # a stale lock file is no obstacle
    assert train.main(flags(empty, "--epochs", 1)) == 0
    assert (empty / "summary.json").exists()


def test_a_run_stopped_in_its_set_up_leaves_its_folder_as_it_found_it(tmp_path, monkeypatch):
    """SIGTERM during the frozen-backbone feature build: no .lock, no tokenizer files, no folder made."""
    def stopped(*args, **kwargs):
        raise run_folder.Stopped(15)

    monkeypatch.setattr(features.FeatureStore, "build", stopped)
    out = tmp_path / "new"
    assert train.main(flags(out, "--epochs", 1, "--freeze", "backbone")) == 128 + 15
    assert not out.exists()
    given = tmp_path / "given"
    given.mkdir()
    assert train.main(flags(given, "--epochs", 1, "--freeze", "backbone")) == 128 + 15
    assert list(given.iterdir()) == []


# --- Divergence stops the run at once; the last checkpoint stays ---------------------------------------

def test_a_huge_rate_diverges_in_one_line_and_leaves_no_nan(tmp_path, capsys):
    model = tmp_path / "bert"
    shutil.copytree(TINY_PLAIN, model)
    before = sha256_of_folder(model)
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1, "--lr", "1e9", "--head-lr", "1e9", "--clip", 0, model=model)) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: training diverged at step ") and " loss is nan; rates lr 1.00e+09 " in line
    assert line.endswith("Nothing was saved from that step on; start again with lower rates (--lr, --head-lr)")
    assert sha256_of_folder(model) == before
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint").exists()
    assert_all_json_is_strict(out)


def test_a_nan_loss_in_epoch_2_keeps_epoch_1s_checkpoint_and_model(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = []

    def nan_from_step_14(logits, labels, level, normalizer=None):
        calls.append({"sentence": "ag", "word": "ner"}[level])  # the seed's tasks, by their levels
        loss = TASK_LOSS(logits, labels, level, normalizer)
        return loss * float("nan") if len(calls) >= 14 else loss  # 12 steps per epoch

    monkeypatch.setattr(train, "task_loss", nan_from_step_14)
    assert train.main(flags(out, "--epochs", 2)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: training diverged at step 14 (epoch 2, task {calls[13]}): the {calls[13]} loss "
                           "is nan; rates lr ")
    monkeypatch.setattr(train, "task_loss", TASK_LOSS)
    kept = sha256_of_folder(out)
    fresh = tmp_path / "fresh"
    assert train.main(flags(fresh, "--epochs", 2, "--stop-after", 1)) == 0  # what epoch 1 left, unharmed
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
    kept_weights, fresh_weights = (checkpoint.read(checkpoint.path_in(folder)).model for folder in (out, fresh))
    assert all(torch.equal(kept_weights[k], fresh_weights[k]) for k in fresh_weights)
    assert [strict_json(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "summary.json").exists() and sha256_of_folder(out) == kept
    assert train.main(["--out", str(out), "--resume", "--no-data-cache"]) == 0  # and the run goes on from there
    assert_all_json_is_strict(out)


class Scaler:
    """An fp16 GradScaler as the log sees it: on, with the scale the test sets."""
    scale = 2.0**16

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


def test_an_fp16_loss_scale_halved_25_times_more_than_doubled_is_divergence():
    scaler = Scaler()
    log = step_log.StepLog(("ag",), Place(torch.device("cpu"), torch.float16), 10, scaler,
                           step_log.Work(1000, 4, 1, 10, 10))
    progress = Progress(flags={})
    log.start_epoch()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    optimizer.param_groups[0]["name"] = "ag_head"

    def step():
        progress.step += 1
        log.add("ag", torch.tensor(0.5), 4)
        return log.after_step(progress, 0, optimizer)

    for scale in (2.0**16, 2.0**3, 2.0**-8):  # its first scale; a few skips; 24 halvings: still its search
        scaler.scale = scale
        for _ in range(10):
            assert step() == 0
    scaler.scale = 2.0**-9  # 25 halvings more than doublings
    for _ in range(9):  # checked with the next log line, at step 40
        step()
    with pytest.raises(Diverged, match=r"^training diverged at step 40 \(epoch 1, task ag\): the fp16 loss scale fell "
                                        r"to 0.00195, 2\^-9 or less: the scaler halved it for steps with inf/NaN "
                                        r"gradients 25 times more than it could double it back; rates "
                                        r"ag_head 1.00e-03\."):
        step()


def test_weights_broken_by_an_epochs_last_update_are_caught_before_anything_is_saved(tmp_path, monkeypatch, capsys):
    """The loss of step 12 was finite; its update made a weight NaN: the epoch's end checks the weights."""
    steps = []

    def breaking(optimizer, scaler, clip):
        skipped = OPTIMIZER_STEP(optimizer, scaler, clip)
        steps.append(1)
        if len(steps) == 12:  # the last step of epoch 1
            with torch.no_grad():
                optimizer.param_groups[-1]["params"][0].fill_(float("nan"))
        return skipped

    monkeypatch.setattr(train, "optimizer_step", breaking)
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 2)) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: training diverged at step 12 (epoch 1, task ")
    assert "): the weights hold NaN or infinite values after its update; rates " in line
    assert not out.exists()  # no model, no checkpoint, no metrics: the folder it made is gone again


def test_an_undefined_spearman_is_null_with_its_reason(tmp_path, capsys):
    """--max-len 3 cuts every pair to [CLS] [SEP] [SEP]: every prediction is the same."""
    out = tmp_path / "run"
    argv = pair_flags(out, "cross", "--epochs", 1)
    argv[argv.index("--max-len") + 1] = "3"
    assert pairs.main(argv) == 0
    log = capsys.readouterr().out
    assert ("valid: Spearman and Pearson are undefined: every predicted score is the same (are the pairs cut to "
            "nothing by --max-len?)") in log
    assert "Spearman undefined | Pearson undefined" in log
    summary = strict_json((out / "summary.json").read_text())
    assert summary["dev"] == {"spearman": None, "pearson": None} and summary["best_epoch"] == 1
    assert [strict_json(r)["spearman"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [None]
    assert_all_json_is_strict(out)


def test_a_nan_prediction_leaves_both_correlations_undefined(capsys):
    """NaN would take a rank of its own, and Spearman a value: both are null, and the log says why."""
    from data import Batching, load_tokenizer
    from support.model_folder import load_pretrained
    from support.sentence_pairs import PairModel, load_stsb

    dev = load_stsb(DATA, load_tokenizer(TINY_PLAIN), 32, "cross")["valid"]
    model = PairModel(load_pretrained(TINY_PLAIN), "cross")
    forward = model.forward
    model.forward = lambda batch: forward(batch).index_fill(0, torch.tensor([0]), float("nan"))
    metrics = pairs.evaluate(model, dev, Place(torch.device("cpu")), Batching(64), what="valid")
    assert (metrics["spearman"], metrics["pearson"]) == (None, None)
    assert "valid: Spearman and Pearson are undefined: some predicted scores are not numbers" in capsys.readouterr().out


# --- Resume from the folder alone; --stop-after N per invocation ------------------------------------

def test_out_and_resume_alone_continue_with_the_saved_flags(tmp_path, capsys):
    given = ("--epochs", 2, "--lr", "1e-3", "--pool", "max", "--seed", 3)
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert train.main(flags(straight, *given)) == 0
    assert train.main(flags(out, *given, "--stop-after", 1)) == 0
    assert "continue with --out" in capsys.readouterr().out
    assert train.main(["--out", str(out), "--resume", "--pool", "mean"]) == 2  # one given as well: the saved one
    assert "changed: --pool max -> mean" in one_error_line(capsys)
    assert train.main(["--out", str(out), "--resume", "--no-data-cache"]) == 0  # a flag a resume may change
    a, b = (strict_json((folder / "summary.json").read_text()) for folder in (straight, out))
    assert {k: a[k] for k in ("ag_accuracy", "ner_f1", "best_epoch")} == {k: b[k] for k in ("ag_accuracy", "ner_f1",
                                                                                           "best_epoch")}
    assert b["config"]["pool"] == "max" and b["config"]["seed"] == 3 and b["config"]["lr"] == 1e-3
    assert b["config"]["model"] == str(TINY_PLAIN.resolve()) and not (DATA / ".cache").exists()


def test_a_run_resumes_from_another_working_folder_and_only_with_its_own_script(tmp_path, capsys, monkeypatch):
    data = tmp_path / "project" / "data"
    shutil.copytree(DATA, data)
    shutil.copytree(TINY_PLAIN, data / "bert-base-uncased")
    monkeypatch.chdir(tmp_path / "project")  # the defaults: data, and data/bert-base-uncased
    assert train.main(["--out", "../run", "--epochs", "2", "--stop-after", "1", "--max-len", "32"]) == 0
    monkeypatch.chdir(tmp_path)
    assert pairs.main(["--out", "run", "--resume"]) == 2
    assert one_error_line(capsys) == ("error: argument --resume: run holds a run of train.py; continue it with "
                                      "that script")
    assert train.main(["--out", "run", "--resume"]) == 0  # data and model: the folders the run resolved
    assert strict_json((tmp_path / "run" / "summary.json").read_text())["config"]["data"] == str(data.resolve())
    assert pairs.main(pair_flags(tmp_path / "pairs", "bi", "--epochs", 2, "--stop-after", 1)) == 0
    assert train.main(["--out", str(tmp_path / "pairs"), "--resume"]) == 2
    assert one_error_line(capsys) == (f"error: argument --resume: {tmp_path / 'pairs'} holds a run of pairs.py; "
                                      "continue it with that script")


def test_a_resume_keeps_the_device_and_precision_the_run_trained_in(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 2, "--stop-after", 1, "--device", "cpu", "--log-every", 7)) == 0
    args = train.parse_args(["--out", str(out), "--resume"])
    assert (args.device, args.log_every, args.no_data_cache, args.stop_after) == ("cpu", 7, True, None)
    init = train.distributed.init
    monkeypatch.setattr(train.distributed, "init", lambda device, amp: Place(init(device, amp).device, torch.bfloat16))
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume"]) == 2  # as on a machine where --amp auto means bf16
    assert one_error_line(capsys) == (f"error: {out / 'checkpoint' / 'checkpoint.safetensors'}: the run trained in "
                                      "fp32, and this one would in bf16 autocast (--device cpu, --amp auto); resume "
                                      "it on the same device and precision")


def test_a_state_written_with_nan_before_json_kept_it_out_is_read_without_it():
    state = {"history": [{"epoch": 1, "spearman": math.nan, "pearson": 0.5}], "best": {"score": -math.inf, "epoch": 1},
             "loss_sum": math.nan, "loss_count": 3}
    checkpoint._without_nan(state)
    assert state == {"history": [{"epoch": 1, "spearman": None, "pearson": 0.5}], "best": None, "loss_sum": 0.0,
                     "loss_count": 0}
    strict_json(json.dumps(state))


def test_pairs_resumes_from_the_folder_alone(tmp_path):
    out = tmp_path / "run"
    assert pairs.main(pair_flags(out, "cross", "--epochs", 2, "--stop-after", 1)) == 0
    assert pairs.main(["--out", str(out), "--resume"]) == 0
    summary = strict_json((out / "summary.json").read_text())
    assert summary["encoder"] == "cross" and summary["config"]["epochs"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_with_a_damaged_checkpoint_says_so_first(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "checkpoint.safetensors").write_bytes(b"garbage")
    monkeypatch.chdir(tmp_path)  # where the default --data and --model do not exist
    assert train.main(["--out", str(out), "--resume"]) == 2
    assert "checkpoint.safetensors: not a readable checkpoint" in one_error_line(capsys)
    assert pairs.main(["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert one_error_line(capsys) == (f"error: argument --resume: {tmp_path / 'none' / 'checkpoint'}"
                                      "/checkpoint.safetensors not found")


def test_stop_after_counts_the_epochs_of_each_invocation(tmp_path, capsys):
    out = tmp_path / "run"
    same_line = flags(out, "--epochs", 3, "--stop-after", 1)
    assert train.main(same_line) == 0
    for epochs_done in (2, 3):  # a job script that repeats one line trains one epoch per time slot
        assert train.main([*same_line, "--resume"]) == 0
        assert len((out / "metrics.jsonl").read_text().splitlines()) == epochs_done
    assert (out / "summary.json").exists()
    log = capsys.readouterr().out
    assert log.count("stopping after epoch") == 2 and "stopping after epoch 2 (--stop-after)" in log


# --- Flags that would do nothing, and what --help and the log say ----------------------------------

@pytest.mark.parametrize("script, argv, message", [
    ("train", ("--freeze", "none,backbone"), "argument --freeze: 'none,backbone': none freezes nothing, so it "
                                            "stands alone, not in a list with other strategies"),
    ("pairs", ("--head-dropout", "0.5"), "argument --head-dropout: only for --encoder cross; the bi-encoder has "
                                        "no head before its cosine"),
    ("pairs", (), "argument --encoder: required: bi or cross"),
])
def test_flags_that_would_do_nothing_are_refused(tmp_path, capsys, script, argv, message):
    out = tmp_path / "run"
    full = flags(out, *argv) if script == "train" else pair_flags(out, "bi", *argv)[0 if argv else 2:]
    assert (train if script == "train" else pairs).main(full) == 2
    assert one_error_line(capsys) == f"error: {message}"
    assert not out.exists()


def test_model_follows_data_and_help_shows_no_none(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line breaks inside a help text
    assert train.parse_args(["--data", "elsewhere"]).model == str(Path("elsewhere") / "bert-base-uncased")
    assert pairs.parse_args(["--encoder", "bi", "--data", "d"]).model == str(Path("d") / "bert-base-uncased")
    for script in (train, pairs):
        with pytest.raises(SystemExit):
            script.parse_args(["--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "(default: DATA/bert-base-uncased)" in text


def test_a_missing_test_split_is_named_before_anything_is_read(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    (data / "conll2003" / "test.txt").unlink()
    read = []
    monkeypatch.setattr(data_module, "encode_file", lambda *a, **k: read.append(a) or TASK_LOSS)
    argv = flags(tmp_path / "run", "--epochs", 1)
    argv[argv.index("--data") + 1] = str(data)
    assert train.main(argv) == 2
    assert one_error_line(capsys) == (
        f"error: {data / 'conll2003' / 'test.txt'}: not found; run `python download.py` first (a run reads "
        f"ag_news/train.csv, ag_news/test.csv, conll2003/train.txt, conll2003/valid.txt, conll2003/test.txt in {data})")
    assert read == []


def test_the_log_counts_one_epoch_in_the_singular(tmp_path, capsys):
    assert pairs.main(pair_flags(tmp_path / "run", "bi", "--epochs", 1, "--limit", 1, "--batch-size", 1)) == 0
    log = capsys.readouterr().out
    assert "stsb: train 1 pair (0 truncated), valid 1 pair (0 truncated)" in log
    assert "training: 1 epoch x 1 step of 1 pair; warmup 0 steps" in log


def test_a_run_started_from_a_trained_run_says_its_heads_start_again(tmp_path, capsys):
    first = tmp_path / "first"
    assert train.main(flags(first, "--epochs", 1)) == 0
    capsys.readouterr()
    assert train.main(flags(tmp_path / "second", "--epochs", 1, model=first)) == 0
    assert (f"note: {first} is a trained model; only its encoder is loaded, not its heads (ag_head, ner_head): a "
            "model built on it starts them again from random") in capsys.readouterr().err
