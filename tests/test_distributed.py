"""Data-parallel training: train.py on 2 CPU processes with gloo, as torchrun would start it.

Each rank runs train.main() in its own process. The workers record, per rank,
the weights at every evaluation and the output files each rank wrote, so the
tests can compare ranks with each other and with a single process.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FIXTURES, ROOT, TINY_PLAIN
from safetensors.torch import load_file, save_file

from support import checkpoint
from support import run_folder
from support import runtime
import train
from support.runtime import Place
from data import Batching, MultiTaskSampler, length_batches, load_splits, load_tokenizer
from model import MultiTaskModel, SentenceEncoder
from support.model_folder import load_multitask, load_pretrained

DATA = FIXTURES / "data"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def flags(out, model=TINY_PLAIN, *extra):
    return ["--model", str(model), "--data", str(DATA), "--out", str(out), "--max-len", "64", "--no-data-cache",
            "--lr", "1e-3", "--log-every", "5", *map(str, extra)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank, world_size, port):
    """What a spawned rank needs first: torchrun's variables, one thread, and the suite's CPU without
    bf16 instructions (conftest's fixture does not reach a new process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    runtime.cpu_bf16 = lambda: None


def worker(rank, world_size, port, argv, record, expect, signal_at=None, nan_at=None):
    """One rank: torchrun's environment, then train.main, recording weights and writes."""
    rank_environment(rank, world_size, port)
    evaluations, writes = [], []
    evaluate = train.evaluate

    def recording_evaluate(model, *args, **kwargs):
        evaluations.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    def recording(name, function):
        def call(*args, **kwargs):
            writes.append(name)
            return function(*args, **kwargs)
        return call

    train.evaluate = recording_evaluate
    if signal_at is not None and rank == 1:  # SIGINT to rank 1 alone, in its step signal_at
        task_loss, calls = train.task_loss, []

        def interrupting(*args):
            calls.append(1)
            if len(calls) == signal_at:
                os.kill(os.getpid(), signal.SIGINT)
            return task_loss(*args)

        train.task_loss = interrupting
    if nan_at is not None and rank == 1:  # a NaN loss on rank 1 alone, in its step nan_at
        task_loss, calls = train.task_loss, []

        def diverging(*args):
            calls.append(1)
            return task_loss(*args) * (float("nan") if len(calls) == nan_at else 1.0)

        train.task_loss = diverging
    run_folder.write_json = recording("write_json", run_folder.write_json)
    run_folder.save_trained = recording("save_trained", run_folder.save_trained)
    checkpoint.save = recording("save_checkpoint", checkpoint.save)
    code = train.main(argv)
    save_file({f"{n}.{k}": v for n, weights in enumerate(evaluations) for k, v in weights.items()},
              record / f"weights.{rank}.safetensors")
    (record / f"writes.{rank}.json").write_text(json.dumps(writes))
    if code != expect:
        raise SystemExit(f"rank {rank}: train.main returned {code}, expected {expect}")


def run_ranks(tmp_path, argv, world_size=2, expect=0, signal_at=None, nan_at=None):
    """Run train.main on world_size processes; returns per rank (weights at each evaluation, files written)."""
    record = tmp_path / f"record-{len(list(tmp_path.glob('record-*')))}"
    record.mkdir()
    mp.spawn(worker, args=(world_size, free_port(), argv, record, expect, signal_at, nan_at), nprocs=world_size)
    results = []
    for rank in range(world_size):
        flat = load_file(record / f"weights.{rank}.safetensors")
        evaluations = {}
        for key, value in flat.items():
            n, name = key.split(".", 1)
            evaluations.setdefault(int(n), {})[name] = value
        results.append(([evaluations[n] for n in sorted(evaluations)],
                        json.loads((record / f"writes.{rank}.json").read_text())))
    return results


def test_two_ranks_stay_identical_and_evaluate_like_one_process(tmp_path, capfd):
    out = tmp_path / "run"
    (weights0, writes0), (weights1, writes1) = run_ranks(tmp_path, flags(out, TINY_PLAIN, "--epochs", 2,
                                                                         "--batch-size", 2))
    said = re.findall(r"^device cpu, fp32 \(--amp auto: [^)]*\), process group gloo, world size 2$",
                      capfd.readouterr().out, re.M)
    assert len(said) == 1  # rank 0 says it, with why the CPU computes in fp32
    assert len(weights0) == len(weights1) == 3  # validation after epochs 1 and 2, then test
    for a, b in zip(weights0, weights1):  # DDP keeps the ranks bit-identical
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(weights0[0]["heads.ag.out.weight"], weights0[1]["heads.ag.out.weight"])  # it trained
    assert writes1 == []  # only rank 0 writes
    assert {"write_json", "save_trained", "save_checkpoint"} <= set(writes0)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    # The sharded test evaluation against one process evaluating the saved best model.
    summary = json.loads((out / "summary.json").read_text())
    splits = load_splits(DATA, load_tokenizer(TINY_PLAIN), 64)
    single = train.evaluate(load_multitask(out), {task: by["test"] for task, by in splits.items()},
                            Place(torch.device("cpu")), Batching(4))
    for key in ("ag_accuracy", "ner_f1", "ner_precision", "ner_recall", "ner_per_type"):
        assert summary[key] == single[key], key


def test_a_nan_loss_on_one_rank_stops_both_at_the_same_step_with_one_line(tmp_path, capfd):
    out = tmp_path / "run"
    (_, writes0), (_, writes1) = run_ranks(tmp_path, flags(out, TINY_PLAIN, "--epochs", 2, "--batch-size", 2),
                                           expect=2, nan_at=3)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err  # rank 0 says it; rank 1 stops as silently as it ran
    assert lines[0].startswith("error: training diverged at step 3 (epoch 1, task ") and \
        " loss is not finite on another rank; rates lr " in lines[0]  # rank 1's step 3, checked at step 5
    assert "save_checkpoint" not in writes0 and "save_trained" not in writes0 and writes1 == []
    assert not (out / "checkpoint").exists() and not (out / "model.safetensors").exists()


def without_dropout(tmp_path):
    folder = tmp_path / "tiny_no_dropout"
    folder.mkdir()
    config = json.loads((TINY_PLAIN / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "vocab.txt"):
        (folder / name).write_bytes((TINY_PLAIN / name).read_bytes())
    return folder


def checkpoint_weights(out):
    return {k: v for k, v in load_file(out / "checkpoint" / "checkpoint.safetensors").items()
            if k.startswith("model.")}


def test_two_ranks_reach_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x batch 4 against 1 process x batch 8: the same global batches, the same loss.

    The loss divides by the label count of the global batch (train.task_loss),
    so the averaged gradient is the one process's gradient; only the order of
    floating-point additions differs (all-reduce, and a batch split in two),
    which after 12 steps leaves differences near 1e-7 (1e-5 allowed). A wrong
    normalization or a missed batch moves weights by about the learning rate,
    1e-3 per step. One tensor is left out: the key bias. It adds the same
    number to every score of a query, which softmax ignores, so its gradient
    is zero in exact arithmetic and rounding noise in practice; AdamW divides
    that noise by its own size and steps by about the learning rate in a
    direction no process agrees on.
    """
    model = without_dropout(tmp_path)
    common = ("--epochs", 2, "--head-dropout", 0, "--seed", 4)
    assert train.main(flags(tmp_path / "one", model, *common, "--batch-size", 8)) == 0
    run_ranks(tmp_path, flags(tmp_path / "two", model, *common, "--batch-size", 4))
    one, two = checkpoint_weights(tmp_path / "one"), checkpoint_weights(tmp_path / "two")
    start = load_pretrained(model).state_dict()
    moved = max((one[f"model.encoder.bert.{k}"] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-3  # the encoder trained
    assert one.keys() == two.keys()
    for key in one:
        a, b = one[key], two[key]
        if key.endswith("attn.qkv.bias"):
            query_a, _, value_a = a.chunk(3)
            query_b, _, value_b = b.chunk(3)
            a, b = torch.cat([query_a, value_a]), torch.cat([query_b, value_b])
        assert (a - b).abs().max() < 1e-5, key


def test_gradual_unfreezing_rebuilds_ddp_and_trains_the_released_layer(tmp_path):
    (weights0, _), (weights1, _) = run_ranks(tmp_path, flags(tmp_path / "run", TINY_PLAIN, "--epochs", 2,
                                                             "--batch-size", 2, "--unfreeze", "gradual"))
    top = "encoder.bert.layers.1.ffn_in.weight"  # the tiny model has 2 layers; epoch 2 releases layer 1
    pretrained = load_pretrained(TINY_PLAIN).state_dict()["layers.1.ffn_in.weight"]
    assert torch.equal(weights0[0][top], pretrained)  # frozen through epoch 1
    assert (weights0[1][top] - pretrained).abs().max() > 1e-4  # trained in epoch 2, after the release
    assert torch.equal(weights0[1][top], weights1[1][top])  # and the same on both ranks
    bottom = "encoder.bert.layers.0.ffn_in.weight"
    assert torch.equal(weights0[1][bottom], load_pretrained(TINY_PLAIN).state_dict()["layers.0.ffn_in.weight"])


def test_frozen_backbone_feature_store_and_a_frozen_task_under_ddp(tmp_path):
    # The whole backbone frozen: the heads train from stored features, DDP wraps them alone.
    (stored0, _), (stored1, _) = run_ranks(tmp_path, flags(tmp_path / "stored", TINY_PLAIN, "--epochs", 2,
                                                           "--batch-size", 2, "--freeze", "backbone"))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(stored0, stored1) for k in a)
    assert not torch.equal(stored0[0]["heads.ner.out.weight"], stored0[1]["heads.ner.out.weight"])
    pretrained = load_pretrained(TINY_PLAIN).state_dict()
    assert all(torch.equal(stored0[1][f"encoder.bert.{k}"], v) for k, v in pretrained.items())
    # Each rank encodes only the rows it reads: its shares of the training batches, its evaluation batches.
    splits = load_splits(DATA, load_tokenizer(TINY_PLAIN), 64)
    lengths = {task: by["train"].lengths() for task, by in splits.items()}
    reads = MultiTaskSampler(lengths, 2, 0, 50, ranks=(0, 2)).reads(0, 0, 2)
    evaluated = sum(len(batch) for by in splits.values() for split in ("valid", "test")
                    for batch in length_batches(by[split].lengths(), 4, rank=0, world_size=2))
    summary = json.loads((tmp_path / "stored" / "summary.json").read_text())
    assert summary["feature_store"]["examples"] == sum(map(len, reads.values())) + evaluated < 92
    # Everything on the NER path frozen (the pooler, which NER steps never read, still trains):
    # NER steps have nothing to update and must not leave DDP waiting for gradients.
    (frozen0, _), (frozen1, _) = run_ranks(tmp_path, flags(tmp_path / "frozen", TINY_PLAIN, "--epochs", 2,
                                                           "--batch-size", 2, "--freeze", "lower:2,ner-head"))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(frozen0, frozen1) for k in a)
    assert torch.equal(frozen0[0]["heads.ner.out.weight"], frozen0[1]["heads.ner.out.weight"])
    assert not torch.equal(frozen0[0]["heads.ag.out.weight"], frozen0[1]["heads.ag.out.weight"])


def test_resume_refuses_another_number_of_processes(tmp_path, capfd):
    out = tmp_path / "run"
    assert train.main(flags(out, TINY_PLAIN, "--epochs", 2, "--batch-size", 4, "--stop-after", 1)) == 0
    run_ranks(tmp_path, flags(out, TINY_PLAIN, "--epochs", 2, "--batch-size", 4, "--resume"), expect=2)
    assert "was written by 1 processes, this run has 2" in capfd.readouterr().err


def test_a_signal_to_one_rank_stops_both_and_resume_is_exact(tmp_path):
    """Dropout on: the resumed run matches only if every rank gets its own random state back."""
    common = ("--epochs", 2, "--batch-size", 2)
    straight = run_ranks(tmp_path, flags(tmp_path / "a", TINY_PLAIN, *common))
    run_ranks(tmp_path, flags(tmp_path / "b", TINY_PLAIN, *common), expect=128 + signal.SIGINT, signal_at=9)
    resumed = run_ranks(tmp_path, flags(tmp_path / "b", TINY_PLAIN, *common, "--resume"))
    final = {"a": straight[0][0][-2], "b": resumed[0][0][-2]}  # weights at the last validation
    assert all(torch.equal(final["a"][k], final["b"][k]) for k in final["a"])


def children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(c) for c in open(path).read().split()] if os.path.exists(path) else []


def rank_of(pid):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the worker processes through /proc")
def test_a_dead_rank_stops_torchrun_and_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), *flags(out, TINY_PLAIN, "--epochs", 500, "--batch-size", 2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    path = checkpoint.path_in(out)
    deadline = time.monotonic() + 120
    while not path.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), launcher.stderr.read().decode()[-2000:]
    workers = [pid for child in children(launcher.pid) for pid in [child, *children(child)]]
    victim = next(pid for pid in workers if rank_of(pid) == 1)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        code = launcher.wait(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)  # whatever is left of the launcher and its workers
    assert code != 0
    assert time.monotonic() - killed < 90
    # The checkpoint on disk is whole (written atomically) and loads into the model.
    saved = checkpoint.read(path)
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN)))
    model.load_state_dict(saved.model)
    assert saved.progress.epoch >= 1
    assert load_multitask(out).heads["ag"].out.weight.shape == (4, 32)


def pairs_worker(rank, world_size, port, argv, record, signal_at):
    """One rank of pairs.py, recording its weights at every evaluation."""
    rank_environment(rank, world_size, port)
    import pairs

    evaluations, evaluate, pair_loss, calls = [], pairs.evaluate, pairs.pair_loss, []

    def recording(model, *args, **kwargs):
        evaluations.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    def interrupting(*args):
        calls.append(1)
        if rank == 1 and len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        return pair_loss(*args)

    pairs.evaluate, pairs.pair_loss = recording, interrupting
    pairs.main(argv)
    save_file({f"{n}.{k}": v for n, weights in enumerate(evaluations) for k, v in weights.items()},
              record / f"pairs.{rank}.safetensors")


def test_a_resumed_gradual_pairs_run_keeps_the_ranks_identical(tmp_path):
    """The resumed run must wrap in DDP the layers its replayed unfreezing released, or the ranks drift."""
    argv = ["--encoder", "cross", "--model", str(TINY_PLAIN), "--data", str(DATA), "--out", str(tmp_path / "run"),
            "--max-len", "32", "--batch-size", "2", "--log-every", "100", "--lr", "1e-3", "--head-lr", "1e-3",
            "--epochs", "3", "--unfreeze", "gradual"]
    mp.spawn(pairs_worker, args=(2, free_port(), argv, tmp_path, 3), nprocs=2)  # stopped at step 3, in epoch 2
    mp.spawn(pairs_worker, args=(2, free_port(), argv + ["--resume"], tmp_path, 0), nprocs=2)
    ranks = [load_file(tmp_path / f"pairs.{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
