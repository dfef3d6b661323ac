"""Tasks as data: the table's rows, a researcher's own tasks from files, the sampling rules, the loss weights,
the data cache keyed by task, and run folders written before tasks were data."""

import json
import os
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT, TINY_PLAIN, assert_close
from support import flags
import predict
import train
from data import Batching, MultiTaskSampler, encode_file, load_splits, load_tokenizer
from support.model_folder import load_multitask
from support.runtime import Place
from support.tasks import NER_TAGS, POS_TAGS, TASKS

sys.path.insert(0, str(ROOT / "scripts"))
from own_task_example import write_own_tasks  # noqa: E402  the example of docs/own-task.md

DATA = FIXTURES / "data"


def run_flags(out, *extra):
    return ["--model", str(TINY_PLAIN), "--data", str(DATA), "--out", str(out), "--max-len", "64",
            "--batch-size", "4", "--no-data-cache", "--log-every", "5", "--lr", "1e-3", *map(str, extra)]


def test_four_tasks_two_of_them_from_the_users_files(tmp_path, capsys):
    """The seed's two tasks and two of one's own train together; every output names all four, the scores
    are what the saved model predicts, a stopped and resumed run gives the same records, and predict.py
    answers for every task."""
    spec = f"ag,ner,{write_own_tasks(tmp_path / 'own')}"
    out = tmp_path / "run"
    assert train.main(run_flags(out, "--epochs", 2, "--tasks", spec, "--task-lr", "mood=2e-3")) == 0
    log = capsys.readouterr().out
    assert re.search(r"loss ag \S+ ner \S+ mood \S+ marks \S+ \|", log)
    assert re.search(r"\| lr \S+ ag_head 1\.\d+e-03 ner_head 1\.\d+e-03 mood_head 2\.\d+e-03 marks_head", log)
    assert "test: AG accuracy" in log and "| MOOD accuracy" in log and "| MARKS accuracy" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ag_accuracy", "ner_f1", "mood_accuracy", "marks_accuracy"} <= set(records[0])
    rows = [set(row) for r in records for row in r["interval_losses"]]  # the tasks of each row's steps
    assert set().union(*rows) == {"step", "ag", "ner", "mood", "marks"} and all("step" in row for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["tasks"] == spec and summary["config"]["task_lr"] == {"mood": 2e-3}
    config = json.loads((out / "config.json").read_text())["multitask"]
    assert [(t["name"], t["level"], t["metric"], t["labels"]) for t in config["tasks"]] == [
        ("ag", "sentence", "accuracy", list(TASKS["ag"].labels)), ("ner", "word", "entity_f1", list(NER_TAGS)),
        ("mood", "sentence", "accuracy", ["calm", "loud"]), ("marks", "word", "token_accuracy", ["C", "V"])]

    # The run folder loads back as trained: its predictions give the test scores summary.json holds.
    model = load_multitask(out)
    tokenizer = load_tokenizer(out)
    mood = [line.split("\t") for line in (tmp_path / "own" / "mood_test.tsv").read_text().splitlines()[1:]]
    marks = [[line.split() for line in block.splitlines()]
             for block in (tmp_path / "own" / "marks_test.txt").read_text().strip().split("\n\n")]
    texts = [f"{row[2]} {row[3]}" for row in mood] + [" ".join(w for _, _, w in s) for s in marks]
    results = predict.predict(model, tokenizer, texts, 64)
    assert set(results[0]) == {"text", "topic", "topic_scores", "entities", "mood", "mood_scores", "marks"}
    right = sum(r["mood"] == row[0] for r, row in zip(results, mood))
    assert summary["mood_accuracy"] == pytest.approx(right / len(mood), abs=1e-12)
    tags = [(w["tag"], gold) for r, s in zip(results[len(mood):], marks) for w, (gold, _, _) in zip(r["marks"], s)]
    assert summary["marks_accuracy"] == pytest.approx(sum(a == b for a, b in tags) / len(tags), abs=1e-12)
    # predict.py on the command line says the same.
    shown = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--model", str(out), texts[0]],
                           capture_output=True, text=True, check=True).stdout
    assert f"  mood: {results[0]['mood']} (" in shown and "  marks: shout/" in shown

    # Stopped after one epoch and resumed: the same records, loss for loss.
    again = tmp_path / "again"
    assert train.main(run_flags(again, "--epochs", 2, "--tasks", spec, "--task-lr", "mood=2e-3",
                                "--stop-after", 1)) == 0
    assert train.main(["--out", str(again), "--resume"]) == 0
    strip = {"elapsed_s", "samples_per_s"}
    resumed = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in strip} for r in records]


def test_a_third_built_in_task_pos_tags_from_the_conll_files(tmp_path):
    """--tasks ag,ner,pos: CoNLL-2003's POS column as a third task, scored by token accuracy, its labels
    CoNLL-2003's tag set; and predict.py tags each word."""
    out = tmp_path / "run"
    assert train.main(run_flags(out, "--epochs", 1, "--tasks", "ag,ner,pos")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["pos_accuracy"] <= 1 and "pos_f1" not in summary
    model = load_multitask(out)
    gold = sorted({line.split()[1] for line in (DATA / "conll2003" / "train.txt").read_text().splitlines()
                   if line.split() and line.split()[0] != "-DOCSTART-"})
    assert model.tasks["pos"].labels == POS_TAGS and set(gold) < set(POS_TAGS) and "NNP" in gold
    splits = load_splits(DATA, load_tokenizer(out), 64, tasks=[TASKS[name] for name in model.tasks])
    test = {task: by["test"] for task, by in splits.items()}
    scores = train.evaluate(model, test, Place(torch.device("cpu")), Batching(8))
    assert scores["pos_accuracy"] == summary["pos_accuracy"] and scores["ner_f1"] == summary["ner_f1"]
    words = predict.predict(model, load_tokenizer(out), ["Germany beat France ."], 64)[0]["pos_tags"]
    assert [w["text"] for w in words] == ["Germany", "beat", "France", "."] and all(w["tag"] in gold for w in words)


def test_two_tasks_over_one_file_never_share_a_cache_entry(tmp_path):
    """NER and POS read the same CoNLL file; the cache keys them apart, so POS never gets NER's tags."""
    cache, tokenizer = tmp_path / "cache", load_tokenizer(TINY_PLAIN)
    path = DATA / "conll2003" / "train.txt"
    ner = encode_file(path, TASKS["ner"], tokenizer, 64, cache)
    pos_task = load_splits(DATA, tokenizer, 64, splits=("train",), tasks=[TASKS["pos"]])["pos"]["train"].task
    pos = encode_file(path, pos_task, tokenizer, 64, cache)
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert pos.word_tags[0] == [line.split()[1] for line in path.read_text().split("\n\n")[1].splitlines()]
    assert set(t for tags in ner.word_tags for t in tags) <= set(NER_TAGS)
    assert not set(t for tags in pos.word_tags for t in tags) & {"B-PER", "I-PER", "B-ORG"}
    again = encode_file(path, pos_task, tokenizer, 64, cache)  # from the cache now
    assert again.word_tags == pos.word_tags and again.labels == pos.labels


@pytest.mark.parametrize("sampling, expected", [
    ("min", [100, 100, 100]),
    ("proportional", [round(300 * n / 900) for n in (100, 400, 400)]),
    ("temperature:2", [round(300 * math.sqrt(n) / 50) for n in (100, 400, 400)]),
])
def test_each_rule_gives_the_tasks_their_shares_of_one_budget(sampling, expected):
    lengths = {"a": np.full(100, 5), "b": np.full(400, 5), "c": np.full(400, 5)}
    sampler = MultiTaskSampler(lengths, 10, seed=0, group_window=0, sampling=sampling)
    assert list(sampler.counts(0).values()) == expected
    drawn = {task: sum(len(b) for t, b in sampler.epoch(0) if t == task) for task in lengths}
    assert list(drawn.values()) == expected


def test_annealed_runs_from_proportional_to_nearly_uniform():
    lengths = {"a": np.full(100, 5), "b": np.full(400, 5)}
    sampler = MultiTaskSampler(lengths, 10, sampling="annealed:5")
    assert sampler.counts(0) == {"a": 40, "b": 160}  # proportional: 200 x 1/5, 4/5
    share = 100 ** 0.2 / (100 ** 0.2 + 400 ** 0.2)  # the last epoch: size^0.2
    assert sampler.counts(4) == {"a": round(200 * share), "b": round(200 * (1 - share))}
    assert sampler.counts(2)["a"] == round(200 * 100 ** 0.6 / (100 ** 0.6 + 400 ** 0.6))


def test_a_task_drawn_beyond_its_size_takes_whole_laps():
    """temperature:0.1 (p ~ size^10) gives the larger task more examples than it has: every example then
    comes once per lap, the rest from a second lap."""
    sampler = MultiTaskSampler({"a": np.full(100, 5), "b": np.full(120, 5)}, 10, sampling="temperature:0.1")
    n = sampler.counts(0)["b"]
    assert n == round(200 * 120 ** 10 / (100 ** 10 + 120 ** 10)) > 120
    drawn = [i for t, b in sampler.epoch(0) if t == "b" for i in b]
    assert len(drawn) == n and set(drawn) == set(range(120)) and max(np.bincount(drawn)) == 2


def test_a_loss_weight_of_zero_leaves_that_head_as_freezing_it_does(tmp_path):
    """--loss-weight ner=0 (no weight decay): the NER head gets zero gradients, so it ends as --freeze
    ner-head leaves it, at its initial values; the AG head trains."""
    common = ("--epochs", 1, "--weight-decay", 0)
    assert train.main(run_flags(tmp_path / "zero", *common, "--loss-weight", "ner=0")) == 0
    assert train.main(run_flags(tmp_path / "frozen", *common, "--freeze", "ner-head")) == 0
    zero, frozen = load_multitask(tmp_path / "zero"), load_multitask(tmp_path / "frozen")
    assert all(torch.equal(a, b) for a, b in zip(zero.heads["ner"].parameters(), frozen.heads["ner"].parameters()))
    torch.manual_seed(0)
    fresh = train.MultiTaskModel(train.SentenceEncoder(zero.bert), head_dropout=0.1)
    assert not torch.equal(zero.heads["ag"].out.weight, fresh.heads["ag"].out.weight)


def test_rates_per_head_and_the_seed_flags():
    """--task-lr wins; else --cls-lr for sentence-level heads and --ner-lr for word-level ones; else --head-lr.
    The projection takes --head-lr."""
    args = train.parse_args(["--tasks", "ag,ner,pos", "--task-lr", "pos=5e-4", "--ner-lr", "2e-3", "--head-lr",
                             "3e-3", "--lr", "1e-4", "--lr-decay", "0.5", "--data", str(DATA)])
    tasks = train.check_args(args)
    rates = train.base_rates(args, 2, tasks)
    assert (rates["ag_head"], rates["ner_head"], rates["pos_head"], rates["project"]) == (3e-3, 2e-3, 5e-4, 3e-3)
    assert rates["layer.1"] == 1e-4 and rates["embeddings"] == 1e-4 * 0.25


def test_cls_head_names_the_sentence_level_heads():
    args = train.parse_args(["--freeze", "cls-head,embeddings", "--data", str(DATA)])
    config = load_multitask.__globals__["load_pretrained"](TINY_PLAIN).config
    assert flags.freeze_plan(args, config, train.check_args(args)).base == {"ag_head", "embeddings"}


def own_error(tmp_path, capsys, tasks=None, files=None, flag=()):
    """Exit status and stderr of train.py with a task file holding `tasks` and the given data files."""
    own = tmp_path / "own"
    own.mkdir(exist_ok=True)
    for name, text in (files or {}).items():
        (own / name).write_text(text)
    if tasks is not None:
        (own / "t.json").write_text(tasks if isinstance(tasks, str) else json.dumps(tasks, indent=1))
    status = train.main(run_flags(tmp_path / "run", "--epochs", 1, "--tasks", f"ag,{own / 't.json'}", *flag))
    return status, capsys.readouterr().err, own


GOOD = {"train.csv": "a b,x\nc d,y\ne f,x\ng h,y\n" * 10, "test.csv": "a b,x\nc d,y\n"}
TASK = {"name": "own", "level": "sentence", "files": {"train": "train.csv", "test": "test.csv"}, "label": 1}


@pytest.mark.parametrize("tasks, files, message", [
    ('[{"name": "own",\n  "level": "sentence"\n  "files": {}}]', {}, "t.json:3: not valid JSON"),
    ([TASK, {**TASK, "name": "Bad-Name"}], GOOD, "t.json:11: name must be lower-case letters"),
    ([{**TASK, "kind": "csv"}], GOOD, "t.json:2: unknown field 'kind'"),
    ([{**TASK, "level": "document"}], GOOD, "t.json:2: task 'own': level must be one of sentence, word"),
    ([{**TASK, "level": "word", "format": "csv"}], GOOD, "t.json:2: task 'own': format of a word-level task is one of conll"),
    ([{**TASK, "metric": "entity_f1"}], GOOD, "t.json:2: task 'own': metric of a sentence-level task is one of"),
    ([{**TASK, "files": {"train": "train.csv"}}], GOOD, "t.json:2: task 'own': files must map train and test"),
    ([{**TASK, "label": 3}], GOOD, "train.csv:1: expected 4 columns, found 2"),
    ([TASK], {**GOOD, "test.csv": "a b,x\nc d,z\n"}, "test.csv:2: label 'z' is not among own's labels (x, y)"),
    ([TASK], {**GOOD, "test.csv": ""}, "test.csv: empty file"),
    ([{**TASK, "files": {"train": "train.csv", "test": "missing.csv"}}], GOOD, "missing.csv: not found"),
    ([{**TASK, "name": "ag"}], GOOD, "argument --tasks: two tasks are named 'ag'"),
])
def test_a_bad_task_is_one_line_naming_the_file_and_line(tmp_path, capsys, tasks, files, message):
    status, err, own = own_error(tmp_path, capsys, tasks, files)
    assert status == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("flag, message", [
    (("--task-lr", "pos=1e-3"), "argument --task-lr: 'pos' is not a task of this run (ag, own)"),
    (("--loss-weight", "own=-1"), "argument --loss-weight: own's value must be a number >= 0, got -1.0"),
    (("--sampling", "temperature:0"), "argument --sampling: expected min, proportional, temperature:T (T > 0)"),
])
def test_bad_task_flags_are_one_line(tmp_path, capsys, flag, message):
    status, err, _ = own_error(tmp_path, capsys, [TASK], GOOD, flag)
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_an_unknown_task_name_is_one_line(tmp_path, capsys):
    assert train.main(run_flags(tmp_path / "run", "--tasks", "ag,sentiment")) == 2
    assert capsys.readouterr().err == ("error: argument --tasks: 'sentiment' is neither a built-in task (ag, ner, "
                                       "pos, chunk) nor a task file (.json)\n")


# --- Run folders written before tasks were data ------------------------------------------------------

BEFORE = FIXTURES / "run_before_tasks"  # train.py --embed-dim 8 --pool max --normalize l2, at 186c8ea
GOLDEN = json.loads((FIXTURES / "run_before_tasks_outputs.json").read_text())


def test_a_run_folder_from_before_loads_with_the_same_outputs(capsys):
    """Its settings (n_classes, n_tags) and heads (cls_head, ner_head) read as the seed's two tasks: the same
    logits, predict.py and embed.py output as the code that wrote it gave."""
    model = load_multitask(BEFORE).eval()
    assert list(model.tasks) == ["ag", "ner"] and model.tasks["ag"].labels == TASKS["ag"].labels
    ids, mask = torch.tensor(GOLDEN["input_ids"]), torch.tensor(GOLDEN["attention_mask"])
    with torch.no_grad():  # to 1e-6, not bit for bit: CPUs of other kinds round the last bits apart
        assert_close(model(ids, mask, "ag"), torch.tensor(GOLDEN["ag_logits"]), atol=1e-6)
        assert_close(model(ids, mask, "ner"), torch.tensor(GOLDEN["ner_logits"]), atol=1e-6)
    assert predict.main(["--model", str(BEFORE), "--json", *GOLDEN["texts"]]) == 0
    assert_same_to_1e6([json.loads(line) for line in capsys.readouterr().out.splitlines()], GOLDEN["predict"])
    import embed
    assert embed.main(["--model", str(BEFORE), "--json", *GOLDEN["texts"]]) == 0
    assert_same_to_1e6(json.loads(capsys.readouterr().out), GOLDEN["embed"])


def assert_same_to_1e6(got, want):
    """JSON values alike: the same keys, lists and strings, and numbers within 1e-6."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_to_1e6(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same_to_1e6(a, b)
    elif isinstance(want, float):
        assert abs(got - want) <= 1e-6, (got, want)
    else:
        assert got == want


def test_a_run_folder_from_before_loads_in_sentence_transformers_and_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    vectors = sentence_transformers.SentenceTransformer(str(BEFORE), device="cpu").encode(GOLDEN["texts"])
    assert np.allclose(vectors, GOLDEN["embed"]["embeddings"], atol=1e-5)
    ours = load_multitask(BEFORE).eval()
    theirs = transformers.AutoModel.from_pretrained(str(BEFORE)).eval()
    ids, mask = torch.tensor(GOLDEN["input_ids"]), torch.tensor(GOLDEN["attention_mask"])
    with torch.no_grad():
        hidden = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(hidden[mask.bool()], ours.bert(ids, mask)[0][mask.bool()], atol=1e-5)


def test_own_tasks_through_the_feature_store_torchrun_and_plot_runs(tmp_path):
    """With the backbone frozen the heads of all four tasks train on stored features, with the scores of
    a run that encodes every batch; two ranks under torchrun give the scores of one process with twice
    the batch; scripts/plot_runs.py draws every task's loss and score."""
    spec = f"ag,ner,{write_own_tasks(tmp_path / 'own')}"
    common = ("--epochs", 2, "--tasks", spec, "--freeze", "backbone", "--head-lr", "1e-2")
    assert train.main(run_flags(tmp_path / "store", *common)) == 0
    assert train.main(run_flags(tmp_path / "plain", *common, "--no-feature-store")) == 0
    store, plain = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("store", "plain"))
    assert store["feature_store"]["examples"] > 0 and plain["feature_store"] is None
    for key in ("ag_accuracy", "ner_f1", "mood_accuracy", "marks_accuracy"):
        assert store[key] == pytest.approx(plain[key], abs=1e-9), key

    one = tmp_path / "one"
    assert train.main(run_flags(one, "--epochs", 1, "--tasks", spec, "--batch-size", 4)) == 0
    two = tmp_path / "two"
    argv = run_flags(two, "--epochs", 1, "--tasks", spec)
    argv[argv.index("--batch-size") + 1] = "2"  # x 2 ranks: the global batch of `one`
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "train.py"), *argv], check=True, capture_output=True, env=env, cwd=ROOT)
    one_scores, two_scores = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    for key in ("ag_accuracy", "ner_f1", "mood_accuracy", "marks_accuracy"):
        assert two_scores[key] == pytest.approx(one_scores[key], abs=1e-6), key

    pytest.importorskip("matplotlib", reason="pip install -r requirements-dev.txt")
    sys.path.insert(0, str(ROOT / "scripts"))
    import matplotlib.pyplot as plt
    import plot_runs
    figure = plot_runs.curves([plot_runs.read_run(tmp_path / "store")], ["store"], plt)
    losses, scores = figure.axes
    assert sorted(line.get_label() for line in losses.lines) == ["store ag", "store marks", "store mood", "store ner"]
    shown = {line.get_label() for line in scores.lines}
    assert {"store AG accuracy", "store entity F1", "store mood accuracy", "store marks accuracy"} <= shown
    assert plot_runs.main([str(tmp_path / "store"), "--out", str(tmp_path / "curves.png")]) == 0
