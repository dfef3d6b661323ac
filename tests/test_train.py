"""train.py end to end on a tiny BERT and fixture data: outputs, resume, signals, AMP, bad flags."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import CPU_BF16, FIXTURES, ROOT, TINY_PLAIN, native_bf16
from safetensors import safe_open

from support import features
from support import run_folder
from support import step_log
import train
from support import runtime
from support.runtime import Place, optimizer_step
from data import Batching, load_splits, load_tokenizer
from model import Bert, BertConfig, MultiTaskModel, SentenceEncoder
from support.model_folder import load_multitask, load_pretrained

DATA = FIXTURES / "data"
TASK_LOSS = train.task_loss


def flags(out, *extra):
    return ["--model", str(TINY_PLAIN), "--data", str(DATA), "--out", str(out), "--max-len", "64",
            "--batch-size", "4", "--no-data-cache", "--log-every", "5", *map(str, extra)]


def checkpoint_weights(out):
    with safe_open(out / "checkpoint" / "checkpoint.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}


def test_full_tiny_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 2, "--lr", "1e-3")) == 0
    log = capsys.readouterr().out
    assert "step 5/24 | epoch 1 | loss ag" in log and "samples/s | ETA" in log
    assert log.splitlines()[-1] == f'use it: python predict.py --model {out} "Apple opened a store in London."'
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["split"]) for r in records] == [(1, 12, "valid"), (2, 24, "valid")]
    assert set(records[0]) == {"epoch", "step", "split", "ag_accuracy", "ner_f1", "ner_precision", "ner_recall",
                               "train_loss", "elapsed_s", "samples_per_s", "interval_losses"}
    # A row per --log-every steps and at the epoch's end, with the losses its log line shows.
    rows = [row for r in records for row in r["interval_losses"]]
    assert [row["step"] for row in rows] == [5, 10, 12, 15, 20, 24]
    shown = {int(m[0]): (float(m[1]), float(m[2])) for m in re.findall(r"step (\d+)/24 .*?loss ag (\S+) ner (\S+)", log)}
    assert [shown[row["step"]] for row in rows] == [(round(row["ag"], 4), round(row["ner"], 4)) for row in rows]
    summary = json.loads((out / "summary.json").read_text())
    scores = [(r["ag_accuracy"] + r["ner_f1"]) / 2 for r in records]
    assert summary["best_epoch"] == 1 + scores.index(max(scores))
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"] > 20_000
    assert summary["config"]["epochs"] == 2 and summary["precision"] == "fp32"
    assert set(summary["timings_s"]) == {"data", "train", "eval", "total"}
    # The saved model is the best one, loads both ways, and reproduces the test metrics.
    model = load_multitask(out)
    load_pretrained(out)  # the encoder part is a plain BERT checkpoint
    tokenizer = load_tokenizer(TINY_PLAIN)
    splits = load_splits(DATA, tokenizer, 64)
    test = {task: by["test"] for task, by in splits.items()}
    again = train.evaluate(model, test, Place(torch.device("cpu")), Batching(8))
    for key in ("ag_accuracy", "ner_f1", "ner_precision", "ner_recall"):
        assert again[key] == summary[key]


def run_recording_losses(monkeypatch, argv):
    losses = []

    def recording(logits, labels, task, normalizer=None):
        loss = TASK_LOSS(logits, labels, task, normalizer)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(train, "task_loss", recording)
    assert train.main(argv) == 0
    return losses


@pytest.mark.parametrize("native", [None, "AMX"])
def test_resume_is_exact(tmp_path, monkeypatch, native):
    """--amp auto: fp32 on a CPU without bf16 instructions, bf16 on one with them (faked); exact both ways."""
    if native:
        native_bf16(monkeypatch, native)
    common = ("--epochs", 2, "--lr", "1e-3", "--unfreeze", "gradual")
    straight = run_recording_losses(monkeypatch, flags(tmp_path / "a", *common))
    first = run_recording_losses(monkeypatch, flags(tmp_path / "b", *common, "--stop-after", 1))
    assert not (tmp_path / "b" / "summary.json").exists()
    rest = run_recording_losses(monkeypatch, flags(tmp_path / "b", *common, "--resume"))
    assert len(straight) == 24 and first + rest == straight  # the same losses, step by step
    a, b = checkpoint_weights(tmp_path / "a"), checkpoint_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for run in "ab":
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["precision"] == ("fp32" if native is None else "bf16 autocast")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_leaves_a_checkpoint_to_resume(tmp_path, signum):
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train.py"), *flags(out, "--epochs", 40, "--log-every", 1)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert "checkpoint saved; continue with" in stderr and "Traceback" not in stderr
    assert not list((out / "checkpoint").glob("*.tmp"))
    with safe_open(out / "checkpoint" / "checkpoint.safetensors", "pt") as f:
        state = json.loads(f.metadata()["state"])
    assert state["step"] >= 3
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN)))
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint_weights(out).items()})
    # It resumes where it stopped (run to the end of a shorter schedule of the same length per epoch).
    result = subprocess.run([*argv, "--resume", "--stop-after", "1"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {out / 'checkpoint' / 'checkpoint.safetensors'}: epoch 1, batch {state['batch']}" \
        in result.stdout


def test_fp16_scaler_skips_a_step_with_an_inf_gradient():
    torch.manual_seed(0)
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    ids, mask = torch.randint(5, 99, (2, 7)), torch.ones(2, 7, dtype=torch.long)

    def backward():
        loss = train.task_loss(model(ids, mask, "ag"), torch.tensor([0, 3]), "sentence")
        scaler.scale(loss).backward()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward()
    model.heads["ag"].out.weight.grad[0, 0] = float("inf")  # as an fp16 overflow would leave it
    assert optimizer_step(optimizer, scaler, clip=1.0) is True
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    backward()
    assert optimizer_step(optimizer, scaler, clip=1.0) is False
    assert not torch.equal(model.heads["ag"].out.weight, before["heads.ag.out.weight"])


def test_bf16_autocast_runs_on_cpu(tmp_path, monkeypatch):
    # Padded batches: unpadded ones in bf16 round their rows (cpu_attention.rounding), so they would
    # draw other dropout masks than fp32's, and the losses would differ by more than the precision.
    common = ("--epochs", 1, "--limit", 8, "--unpad", "never")
    fp32 = run_recording_losses(monkeypatch, flags(tmp_path / "fp32", *common))
    bf16 = run_recording_losses(monkeypatch, flags(tmp_path / "bf16", *common, "--amp", "bf16"))
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["precision"] == "bf16 autocast"
    # bf16 keeps 8 bits of mantissa: the losses differ from fp32, but only a little.
    assert bf16 != fp32 and max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.05


def test_mid_epoch_signal_then_resume_is_exact(tmp_path, monkeypatch):
    """A run stopped by SIGINT in its second epoch, after gradual unfreezing released a layer, resumes exactly."""
    common = ("--epochs", 3, "--lr", "1e-3", "--unfreeze", "gradual")
    straight = run_recording_losses(monkeypatch, flags(tmp_path / "a", *common))
    losses = []

    def interrupting(logits, labels, task, normalizer=None):
        loss = TASK_LOSS(logits, labels, task, normalizer)
        losses.append(loss.item())
        if len(losses) == 17:  # step 17 of 36: inside epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(train, "task_loss", interrupting)
    assert train.main(flags(tmp_path / "b", *common)) == 128 + signal.SIGINT
    rest = run_recording_losses(monkeypatch, flags(tmp_path / "b", *common, "--resume"))
    assert losses + rest == straight
    a, b = checkpoint_weights(tmp_path / "a"), checkpoint_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def records(run):  # without the timings, which differ between any two runs
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "samples_per_s")} for line in lines]

    assert records("a") == records("b")  # train_loss included


def test_resume_refuses_changed_flags_and_out_refuses_a_second_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 2, "--stop-after", 1)) == 0
    assert train.main(flags(out, "--epochs", 2, "--resume", "--batch-size", 8)) == 2
    err = capsys.readouterr().err
    assert "--resume needs the flags of the saved run; changed: --batch-size 4 -> 8" in err
    assert train.main(flags(out, "--epochs", 2)) == 2
    assert f"argument --out: {out} already holds a run; add --resume" in capsys.readouterr().err
    (out / "checkpoint" / "checkpoint.safetensors").write_bytes(b"garbage")
    assert train.main(flags(out, "--epochs", 2, "--resume")) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_a_task_with_nothing_to_train_is_skipped_not_fatal(tmp_path):
    """--freeze backbone,ner-head trains only the classification head; NER batches still run forward."""
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1, "--freeze", "backbone,ner-head")) == 0
    summary = json.loads((out / "summary.json").read_text())
    model, start = load_multitask(out), MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN)))
    assert summary["parameters"]["trainable"] == sum(p.numel() for p in model.heads["ag"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.bert.parameters(), start.bert.parameters()))
    bert = load_pretrained(TINY_PLAIN)
    torch.manual_seed(0)  # train.py seeds after loading BERT, then builds the heads
    fresh = MultiTaskModel(SentenceEncoder(bert))
    assert all(torch.equal(a, b) for a, b in zip(model.heads["ner"].parameters(), fresh.heads["ner"].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.heads["ag"].parameters(), fresh.heads["ag"].parameters()))


def test_freeze_all_only_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 2, "--freeze", "all")) == 0
    log = capsys.readouterr().out
    assert "--freeze all: nothing trains; evaluating the model as it is, on the test split only" in log
    assert "training:" not in log and "optimizer groups" not in log and "step " not in log  # no plan, no steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["trainable"] == 0 and summary["best_epoch"] is None
    assert not (out / "metrics.jsonl").exists()
    saved, start = load_pretrained(out), load_pretrained(TINY_PLAIN)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), start.state_dict().values()))


@pytest.mark.parametrize("extra, message", [
    (["--freeze", "top"], "error: argument --freeze: unknown strategy 'top'; choose from none, all, backbone"),
    (["--freeze", "lower:5"], "error: argument --freeze: 'lower:5': N must be a whole number from 1 to 2"),
    (["--lr", "-0.001"], "error: argument --lr: must be a number >= 0, got -0.001"),
    (["--amp", "fp16", "--device", "cpu"], "error: argument --amp: fp16 needs a CUDA GPU"),
    (["--data", "/nonexistent/data"], ("error: argument --data: /nonexistent/data is not a folder; "
                                       "run `python download.py` first")),
    (["--max-len", "65"], "error: argument --max-len: 65 is more than the model's max_position_embeddings (64)"),
    (["--resume"], "error: argument --resume:"),
    (["--freeze", "backbone", "--unfreeze", "gradual"],
     "error: argument --unfreeze: gradual unfreezing releases the backbone layer by layer, but --freeze backbone "
     "keeps all of it frozen; gradual already starts from a frozen backbone, so leave 'backbone' out of --freeze"),
    (["--freeze", "all", "--unfreeze", "gradual"], "error: argument --unfreeze: gradual unfreezing releases"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    argv = flags(tmp_path / "run", "--epochs", 1) + extra
    if extra[0] == "--data":
        argv[argv.index("--data") + 1] = extra[1]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_bad_flag_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags(tmp_path / "run", "--freeze", "lower:9")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: argument --freeze: 'lower:9'")


def test_frozen_backbone_feature_store_trains_the_heads_like_the_backbone_path(tmp_path, monkeypatch, capsys):
    common = ("--epochs", 2, "--freeze", "backbone", "--lr", "1e-3", "--head-lr", "1e-2", "--embed-dim", 16)
    stored = run_recording_losses(monkeypatch, flags(tmp_path / "stored", *common))
    # train: 38 AG + 24 CoNLL (2 epochs of 24 per task read every AG row); valid 2 + 8; test 12 + 8
    assert "frozen-backbone features: 92 examples" in capsys.readouterr().out
    plain = run_recording_losses(monkeypatch, flags(tmp_path / "plain", *common, "--no-feature-store"))
    assert "frozen-backbone features" not in capsys.readouterr().out
    assert len(stored) == len(plain) == 24
    assert max(abs(a - b) for a, b in zip(stored, plain)) <= 1e-5
    a, b = checkpoint_weights(tmp_path / "stored"), checkpoint_weights(tmp_path / "plain")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.equal(a["model.heads.ag.out.weight"],
                           MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN))).heads["ag"].out.weight)  # the heads trained


def test_feature_store_over_its_limit_falls_back_to_running_the_backbone(tmp_path, capsys):
    assert train.main(flags(tmp_path / "run", "--epochs", 1, "--freeze", "backbone", "--feature-store-limit-mb", 0)) == 0
    assert "over --feature-store-limit-mb 0; the steps and evaluations run the backbone instead" in capsys.readouterr().out


def test_compiled_encoder_trains_and_evaluates_like_eager(tmp_path, monkeypatch):
    """--compile: the same losses and scores as eager code on the same padded batches.

    Inductor is told to draw random numbers through the eager operators
    (fallback_random), so that dropout draws the same masks in both runs.
    """
    inductor = pytest.importorskip("torch._inductor.config")
    monkeypatch.setattr(inductor, "fallback_random", True)
    argv = flags(tmp_path / "compiled", "--epochs", 1, "--compile", "--max-len", 8)  # one width: fewer compilations
    compiled = run_recording_losses(monkeypatch, argv)
    with monkeypatch.context() as m:  # the same run with compilation a no-op: eager, batches padded to 8
        m.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)
        eager = run_recording_losses(m, flags(tmp_path / "eager", "--epochs", 1, "--compile", "--max-len", 8))
    assert len(compiled) == len(eager) == 12
    assert max(abs(a - b) for a, b in zip(compiled, eager)) < 1e-5
    scores = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("compiled", "eager")]
    for key in ("ag_accuracy", "ner_f1"):
        assert scores[0][key] == scores[1][key]


@pytest.mark.parametrize("old, hint", [
    ("--no-cache", "error: argument --no-cache: renamed; use --no-feature-store (the frozen backbone's outputs) "
                   "or --no-data-cache (tokenized data)\n"),
    ("--cache-limit-mb=64", "error: argument --cache-limit-mb: renamed; use --feature-store-limit-mb\n"),
])
def test_renamed_flags_are_refused_with_their_new_names(tmp_path, capsys, old, hint):
    with pytest.raises(SystemExit) as exit_:
        train.main(flags(tmp_path / "run", "--freeze", "backbone", old))
    assert exit_.value.code == 2 and capsys.readouterr().err == hint
    assert not (tmp_path / "run").exists()


def test_a_log_line_at_least_every_log_seconds(tmp_path, monkeypatch, capsys):
    """--log-every 1000 would print only at the epochs' ends; the clock asks for a line after every step here."""
    monkeypatch.setattr(step_log, "LOG_SECONDS", 0.0)
    argv = flags(tmp_path / "run", "--epochs", 2)
    argv[argv.index("--log-every") + 1] = "1000"
    assert train.main(argv) == 0
    steps = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps == [f"step {n}/24" for n in range(1, 25)]


def test_the_eta_counts_the_evaluation_passes_still_to_come():
    from support.checkpoint import Progress

    progress = Progress(flags={}, step=40, history=[{}])  # epoch 1 of 3 done, with its validation pass
    # valid: 100 AG + 50 CoNLL examples; test: 300 + 10
    work = step_log.Work(total_steps=100, batch_size=32, epochs=3, valid_examples=150, final_examples=310)
    # 60 steps x 32 examples at 64/s = 30 s; then 2 valid passes (150 each) and the test (310): 610 examples,
    # before any pass was timed at 3 x 64 = 192/s
    assert step_log.seconds_left(work, progress, 64.0) == pytest.approx(30 + 610 / 192)
    progress.eval_examples, progress.eval_seconds = 150, 3.0  # measured: 50/s
    assert step_log.seconds_left(work, progress, 64.0) == pytest.approx(30 + 610 / 50)


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999"])
def test_a_seed_out_of_range_is_refused_before_anything_is_written(tmp_path, capsys, seed):
    out = tmp_path / "run"
    assert train.main(flags(out, "--seed", seed)) == 2
    err = capsys.readouterr().err
    assert err == f"error: argument --seed: must be a whole number from 0 to {2**32 - 1}, got {seed}\n"
    assert not out.exists()


@pytest.mark.parametrize("script", ["train.py", "pairs.py"])
def test_help_gives_the_default_of_every_flag_that_has_one(script):
    text = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          check=True).stdout
    flags = ("--epochs", "--batch-size", "--seed", "--device", "--weight-decay", "--head-dropout", "--lr", "--amp")
    entries = " ".join(text.split()).split(" --")
    for flag in flags:
        entry = next(e for e in entries if e.startswith(flag[2:] + " "))
        assert "(default: " in entry, f"{script} --help: {flag} shows no default"


def test_a_run_folder_in_use_is_refused_and_released_after(tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another run holding the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on elsewhere, since 2026-11-26 10:00:00\n")
        held.flush()
        assert train.main(flags(out, "--epochs", 1, "--limit", 8)) == 2
        err = capsys.readouterr().err
        assert err == (f"error: argument --out: {out} is in use by a run still going (pid 12345 on elsewhere, "
                       "since 2026-11-26 10:00:00); wait for it, or choose another --out\n")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written into the other run's folder
    assert train.main(flags(out, "--epochs", 1, "--limit", 8)) == 0  # released: the folder is free
    assert (out / "summary.json").exists()
    with open(out / ".lock", "a+") as after:  # and the run let go of it as it ended
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "runs/20261126-120000")  # the same second, 3 times
    folders = [run_folder.new_run_folder() for _ in range(3)]
    assert [str(f) for f in folders] == ["runs/20261126-120000", "runs/20261126-120000-2", "runs/20261126-120000-3"]
    assert all(f.is_dir() for f in folders)


def test_too_few_ag_rows_for_a_validation_split_are_refused(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    rows = (data / "ag_news" / "train.csv").read_text().splitlines()
    (data / "ag_news" / "train.csv").write_text("\n".join(rows[:10]) + "\n")  # 5% of 10 rounds to no row
    out = tmp_path / "run"
    argv = flags(out, "--epochs", 1)
    argv[argv.index("--data") + 1] = str(data)
    assert train.main(argv) == 2
    assert capsys.readouterr().err == (f"error: {data}/ag_news/train.csv: 10 rows leave no validation rows (5% of "
                                       "train are held out for validation); give it at least 11 rows\n")
    assert not out.exists()  # refused during set-up: no empty run folder left behind
    (data / "ag_news" / "train.csv").write_text("\n".join(rows[:11]) + "\n")
    assert train.main(argv) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["ag_accuracy"] in (0.0, 1.0)  # 1 row
    argv[argv.index("--out") + 1] = str(tmp_path / "all-held")
    assert train.main(argv + ["--ag-valid-fraction", "0.97"]) == 2
    assert capsys.readouterr().err.endswith("11 rows leave no training rows (97% of train are held out for "
                                            "validation); give it at least 17 rows\n")


def test_fixed_loss_norm_divides_every_batch_of_a_task_by_the_same_count(tmp_path, monkeypatch):
    calls = {}
    for norm in ("batch", "fixed"):
        calls[norm] = []

        def recording(logits, labels, level, normalizer=None, seen=calls[norm]):
            loss = TASK_LOSS(logits, labels, level, normalizer)
            task = {"sentence": "ag", "word": "ner"}[level]  # the seed's tasks, by their levels
            seen.append((task, int((labels != -100).sum()), normalizer, loss.item()))
            return loss

        monkeypatch.setattr(train, "task_loss", recording)
        assert train.main(flags(tmp_path / norm, "--epochs", 1, "--lr", "1e-3", "--loss-norm", norm)) == 0
    splits = load_splits(DATA, load_tokenizer(TINY_PLAIN), 64, splits=("train",))
    mean_labels = {"ag": 1.0, "ner": sum(int((torch.tensor(x) != -100).sum()) for x in splits["ner"]["train"].labels)
                   / len(splits["ner"]["train"])}
    assert mean_labels["ner"] > 3  # the fixture's sentences hold several words
    for task, labels, normalizer, _ in calls["batch"]:
        assert normalizer == labels  # the batch's own mean
    for task, labels, normalizer, _ in calls["fixed"]:
        assert normalizer == pytest.approx(4 * mean_labels[task])  # --batch-size 4
    # The first step starts from the same weights: the same summed loss, divided differently.
    (task, labels, batch_norm, batch_loss), (_, _, fixed_norm, fixed_loss) = calls["batch"][0], calls["fixed"][0]
    assert fixed_loss * fixed_norm == pytest.approx(batch_loss * batch_norm, rel=1e-5)
    assert [c[:2] for c in calls["batch"]] == [c[:2] for c in calls["fixed"]]  # the same batches


def test_auto_rates_are_resolved_recorded_and_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 2, "--stop-after", 1)) == 0
    expected = "auto rates: --lr 0.0003 (hidden size 32), --lr-decay 0.729 (2 layers)\n"
    assert expected in capsys.readouterr().out  # in full: passing them back gives the same run
    assert train.main(flags(out, "--epochs", 2, "--resume")) == 0  # auto again gives the same numbers
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["lr"], config["lr_decay"]) == (pytest.approx(3e-4), pytest.approx(0.729))
    assert train.main(flags(out, "--epochs", 2, "--lr", "1e-3", "--resume")) == 2
    assert capsys.readouterr().err.endswith("changed: --lr 0.0003 -> 0.001\n")


@pytest.mark.parametrize("share", ["0", "1", "-0.1", "nan"])
def test_an_ag_validation_share_outside_0_1_is_refused(tmp_path, capsys, share):
    out = tmp_path / "run"
    assert train.main(flags(out, "--ag-valid-fraction", share)) == 2
    assert capsys.readouterr().err == f"error: argument --valid-fraction: must be in (0, 1), got {float(share)}\n"
    assert not out.exists()


def signal_in_evaluation(monkeypatch, split, signum):
    """Send signum to this process as the evaluation of split starts."""
    evaluate_split = train.evaluate_split

    def interrupted(s, name, *args):
        if name == split:
            os.kill(os.getpid(), signum)
        return evaluate_split(s, name, *args)

    monkeypatch.setattr(train, "evaluate_split", interrupted)


def test_a_signal_in_the_final_test_leaves_the_checkpoint_and_the_hint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_in_evaluation(m, "test", signal.SIGINT)
        assert train.main(flags(out, "--epochs", 1)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err == f"stopped by signal 2; continue from the last checkpoint with --out {out} --resume\n"
    assert not (out / "summary.json").exists() and (out / "model.safetensors").exists()
    assert train.main(flags(out, "--epochs", 1, "--resume")) == 0  # the test pass runs again, alone
    assert json.loads((out / "summary.json").read_text())["best_epoch"] == 1


def test_a_signal_in_a_validation_pass_stops_after_its_checkpoint(tmp_path, monkeypatch, capsys):
    straight = tmp_path / "a"
    assert train.main(flags(straight, "--epochs", 2, "--lr", "1e-3")) == 0
    out = tmp_path / "b"
    with monkeypatch.context() as m:
        signal_in_evaluation(m, "valid", signal.SIGTERM)
        assert train.main(flags(out, "--epochs", 2, "--lr", "1e-3")) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.endswith(f"stopped by signal 15 after epoch 1: checkpoint saved; "
                                            f"continue with --out {out} --resume\n")
    assert train.main(flags(out, "--epochs", 2, "--lr", "1e-3", "--resume")) == 0
    a, b = checkpoint_weights(straight), checkpoint_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_in_set_up_leaves_nothing(tmp_path, monkeypatch, capsys):
    load = train.load_splits

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(train, "load_splits", interrupted)
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1)) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "stopped by signal 15; no checkpoint was written yet: start the run again\n"
    assert not out.exists()


def test_a_full_disk_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    def full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(run_folder, "write_json", full)
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1)) == 2
    assert capsys.readouterr().err == f"error: {out / 'metrics.jsonl'}: No space left on device\n"


def test_every_written_file_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert train.main(flags(out, "--epochs", 1, "--limit", 8)) == 0
    finally:
        os.umask(previous)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {"model.safetensors", "checkpoint/checkpoint.safetensors", "summary.json", "config.json"} <= modes.keys()
    assert {name: mode for name, mode in modes.items() if name != ".lock"} == \
        {name: 0o640 for name in modes if name != ".lock"}


def test_a_full_disk_while_saving_weights_leaves_no_config_without_them(tmp_path, monkeypatch, capsys):
    from support import model_folder
    from safetensors import SafetensorError

    def full(tensors, path, *args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(model_folder, "save_file", full)
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a safetensors file could not be written or read (Error while serializing")
    assert err.count("\n") == 1
    assert not (out / "config.json").exists() and not list(out.glob("*.tmp"))


def test_a_signal_in_the_feature_build_ends_with_the_hint(tmp_path, monkeypatch, capsys):
    build = features.FeatureStore.build

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return build(*args, **kwargs)

    monkeypatch.setattr(features.FeatureStore, "build", interrupted)
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1, "--freeze", "backbone")) == 128 + signal.SIGINT
    assert capsys.readouterr().err.endswith("stopped by signal 2; no checkpoint was written yet: start the run again\n")


def test_a_trained_run_folder_is_a_model_folder_for_embed(tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(out, "--epochs", 1, "--limit", 8)) == 0
    result = subprocess.run([sys.executable, str(ROOT / "embed.py"), "--model", str(out), "--json", "a b"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    vector = json.loads(result.stdout)["embeddings"][0]
    encoder = load_multitask(out).encoder.eval()
    expected = encoder.encode(["a b"], load_tokenizer(out), max_len=json.loads(result.stdout)["max_len"])[0]
    assert torch.allclose(torch.tensor(vector), expected, atol=1e-6)


def test_the_estimate_counts_the_encoders_work_trained_frozen_and_evaluated():
    """2 FLOP per weight per token forward, 3x that trained; a frozen backbone encodes each row once."""
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN)))
    weights = sum(p.numel() for p in model.bert.layers.parameters())
    sampler = train.MultiTaskSampler({"ag": [10, 30]}, 2)  # min: 2 examples an epoch, 20 pieces each
    valid = load_splits(DATA, load_tokenizer(TINY_PLAIN), 64)["ag"]["valid"]
    splits = {"ag": {"valid": valid, "test": valid}}
    pieces = int(splits["ag"]["valid"].lengths().sum())
    assert step_log.estimated_flops(model, sampler, splits, range(3), frozen=False) == \
        2 * weights * (3 * 3 * 2 * 20 + 3 * pieces + pieces)  # 3 epochs trained, a valid pass each, the test
    assert step_log.estimated_flops(model, sampler, splits, range(3), frozen=True) == \
        2 * weights * (2 * 20 + pieces + pieces)  # each train row encoded once, each evaluated row once


def test_a_long_cpu_run_says_so_at_start_with_the_faster_options(monkeypatch, capsys):
    wide = BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64)
    monkeypatch.setattr(step_log, "matmul_rate", lambda width: 1e9 / step_log.STEP_SHARE)  # a run: 1 GFLOP/s
    for flops, device, config, expected in ((1e13, "cpu", wide, "about 2h46m"), (2e11, "cpu", wide, None),
                                            (1e13, "cuda", wide, None), (1e13, "cpu", BertConfig(
                                                hidden_size=384, num_hidden_layers=1, intermediate_size=64), "")):
        model = MultiTaskModel(SentenceEncoder(Bert(config)))
        monkeypatch.setattr(step_log, "estimated_flops", lambda *args: flops)
        step_log.warn_if_long(model, None, None, range(1), False, torch.device(device))
        out = capsys.readouterr().out
        if expected is None:
            assert out == ""
        else:
            assert out.startswith(f"note: this run will take {expected}") and "--limit N" in out
            assert "fewer --epochs, or a GPU" in out
            assert ("a smaller --model (all-MiniLM-L6-v2" in out) == (config.hidden_size > 384)  # not for MiniLM



@pytest.mark.parametrize("amx, avx512_bf16, native", [(False, False, None), (False, True, "AVX512-BF16"),
                                                      (True, True, "AMX")])
def test_auto_is_bf16_on_a_cpu_that_multiplies_bf16_natively_and_says_why(monkeypatch, amx, avx512_bf16, native):
    """Read from the CPU's feature flags (runtime.cpu_bf16), faked here both ways."""
    monkeypatch.setattr(runtime, "cpu_bf16", CPU_BF16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert runtime.cpu_bf16() == native
    cpu = torch.device("cpu")
    assert runtime.pick_amp("auto", cpu) is (None if native is None else torch.bfloat16)
    assert runtime.pick_amp("off", cpu) is None and runtime.pick_amp("bf16", cpu) is torch.bfloat16
    expected = ("fp32 (--amp auto: this CPU has no bf16 instructions, so bf16 would be emulated and slower)"
                if native is None else f"bf16 autocast (--amp auto: this CPU multiplies bf16 natively, {native}; "
                "--amp off for fp32)")
    assert runtime.describe_precision(Place(cpu, runtime.pick_amp("auto", cpu)), "auto") == expected
    assert runtime.describe_precision(Place(cpu), "off") == "fp32"  # asked for: nothing to explain
    assert runtime.describe_precision(Place(cpu, torch.bfloat16), "bf16") == "bf16 autocast"
