"""checkpoint.py: what save writes, read gives back and verifies, and the checks --resume makes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_PLAIN
from safetensors import safe_open
from safetensors.torch import save_file

from support import checkpoint
import train
from support.checkpoint import Checkpoint, Progress
from support.runtime import CheckpointError
from model import MultiTaskModel, SentenceEncoder
from support.model_folder import load_pretrained


def trained_objects():
    torch.manual_seed(0)
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN)))
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "name": "all", "base_lr": 1e-3}])
    loss = model(torch.randint(5, 99, (2, 7)), torch.ones(2, 7, dtype=torch.long), "ag").sum()
    loss.backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scaler


def test_save_then_read_gives_back_every_part(tmp_path):
    model, optimizer, scaler = trained_objects()
    progress = Progress(flags={"seed": 3}, world_size=2, epoch=1, batch=5, step=17, best={"score": 0.5, "epoch": 1},
                        history=[{"epoch": 1}], loss_sum=2.5, loss_count=4)
    torch.manual_seed(1)
    other = torch.get_rng_state()  # rank 1's state: another seed's
    torch.manual_seed(0)
    rngs = [{"torch": torch.get_rng_state()}, {"torch": other}]
    path = checkpoint.path_in(tmp_path / "run")
    checkpoint.save(path, Checkpoint(progress, model.state_dict(), optimizer.state_dict(), scaler.state_dict(), rngs))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.safetensors"]  # no temporary file left
    saved = checkpoint.read(path)
    assert saved.progress == progress
    assert saved.model.keys() == model.state_dict().keys()
    assert all(torch.equal(saved.model[k], v) for k, v in model.state_dict().items())
    state = optimizer.state_dict()["state"]
    assert saved.optimizer["state"].keys() == state.keys()
    assert all(torch.equal(saved.optimizer["state"][i][k], v) for i in state for k, v in state[i].items())
    assert [torch.equal(r["torch"], e["torch"]) for r, e in zip(saved.rng, rngs)] == [True, True]

    # restore puts rank 1's own random state back, and the weights into a fresh model
    fresh_model, fresh_optimizer, fresh_scaler = trained_objects()
    with torch.no_grad():
        fresh_model.heads["ag"].out.weight.zero_()
    assert checkpoint.restore(saved, path, fresh_model, fresh_optimizer, fresh_scaler, rank=1) == progress
    assert torch.equal(torch.get_rng_state(), rngs[1]["torch"])
    assert torch.equal(fresh_model.heads["ag"].out.weight, model.heads["ag"].out.weight)


def test_read_refuses_what_is_not_a_checkpoint(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a readable checkpoint"):
        checkpoint.read(garbage)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)  # a safetensors file, but not one of ours
    with pytest.raises(CheckpointError, match="weights.safetensors: not a checkpoint of this program"):
        checkpoint.read(foreign)


def test_resume_checks_name_what_changed():
    progress = Progress(flags={"seed": 0, "batch_size": 4, "out": "a", "log_every": 5}, world_size=1)
    checkpoint.check_resume("ck", progress, {"seed": 0, "batch_size": 4, "out": "b", "log_every": 1}, 1)
    with pytest.raises(CheckpointError, match=r"ck: --resume needs the flags of the saved run; changed: "
                                              r"--seed 0 -> 1; --batch-size 4 -> 8"):
        checkpoint.check_resume("ck", progress, {"seed": 1, "batch_size": 8, "out": "a", "log_every": 5}, 1)
    with pytest.raises(CheckpointError, match="ck was written by 1 processes, this run has 2"):
        checkpoint.check_resume("ck", progress, {"seed": 0, "batch_size": 4, "out": "a", "log_every": 5}, 2)


# --- A damaged, foreign or mismatched checkpoint is refused in one line, and kept --------------


def run_flags(out, data=FIXTURES / "data", model=TINY_PLAIN, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--max-len", "64", "--batch-size", "4",
            "--no-data-cache", "--log-every", "5", "--epochs", "2", *map(str, extra)]


@pytest.fixture
def stopped_run(tmp_path):
    """A run stopped after epoch 1 of 2 on its own copies of the data and model; returns (out, data, model)."""
    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(FIXTURES / "data", data)
    shutil.copytree(TINY_PLAIN, model)
    out = tmp_path / "run"
    assert train.main(run_flags(out, data, model, "--stop-after", 1)) == 0
    return out, data, model


def resave(path, change):
    """Rewrite a checkpoint with change(tensors, metadata) applied and a checksum that fits again."""
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors, metadata)
    metadata["sha256"] = checkpoint.checksum(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def refused(capsys, argv, message):
    def files():  # all but the lock file, which names the last process that held the folder
        return {p.name: p.read_bytes() for p in Path(argv[argv.index("--out") + 1]).rglob("*")
                if p.is_file() and p.name != ".lock"}

    before = files()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert files() == before  # nothing written, nothing lost: the checkpoint is kept for inspection


def flip_data_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01  # inside the last tensor
    path.write_bytes(bytes(raw))


def edit_header(path):
    raw = path.read_bytes()
    state_at = raw.index(b'\\"step\\": ') + len(b'\\"step\\": ')
    digit = raw[state_at:state_at + 1]
    path.write_bytes(raw[:state_at] + (b"7" if digit != b"7" else b"8") + raw[state_at + 1:])


@pytest.mark.parametrize("damage, message", [
    (flip_data_byte, "checksum mismatch: the file was changed or damaged"),
    (edit_header, "checksum mismatch: the file was changed or damaged"),
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "not a readable checkpoint"),
    (lambda p: shutil.copyfile(TINY_PLAIN / "model.safetensors", p), "not a checkpoint of this program"),
    (lambda p: resave(p, lambda t, m: m.update(format="1")), "checkpoint format 1, this program reads format 2"),
    (lambda p: resave(p, lambda t, m: m.pop("format")), "checkpoint format 1, this program reads format 2"),
    (lambda p: resave(p, lambda t, m: t.pop("rng.torch")), "not a checkpoint of this program (KeyError('rng.torch'))"),
    (lambda p: resave(p, lambda t, m: m.update(state="{")), "not a checkpoint of this program (JSONDecodeError"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused(stopped_run, capsys, damage, message):
    out, data, model = stopped_run
    damage(checkpoint.path_in(out))
    capsys.readouterr()
    refused(capsys, run_flags(out, data, model, "--resume"), message)


def test_changed_data_or_model_is_refused(stopped_run, capsys):
    out, data, model = stopped_run
    capsys.readouterr()
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["pooler.dense.bias"] = tensors["pooler.dense.bias"] + 1e-3
    save_file(tensors, weights)
    refused(capsys, run_flags(out, data, model, "--resume"), "changed: the contents of --model (sha256 ")
    weights.write_bytes(original)
    conll = data / "conll2003" / "train.txt"
    conll.write_text(conll.read_text() + "\nParis NNP B-NP B-LOC\n")
    refused(capsys, run_flags(out, data, model, "--resume"), "changed: the contents of --data (sha256 ")
    other = data.parent / "other-data"
    shutil.copytree(data, other)
    refused(capsys, run_flags(out, other, model, "--resume"), f"changed: --data {data.resolve()} -> {other.resolve()}")


def test_the_same_folders_by_other_paths_resume(stopped_run, tmp_path, monkeypatch):
    out, data, model = stopped_run
    (tmp_path / "link").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    assert train.main(run_flags(out, Path("link"), Path("model") / ".." / "model", "--resume")) == 0
    assert json.loads((out / "summary.json").read_text())["best_epoch"] in (1, 2)


def test_a_checkpoint_written_before_a_flag_existed_resumes_with_that_flags_old_behaviour():
    from types import SimpleNamespace

    from support.checkpoint import ADDED_FLAGS, check_resume
    saved = SimpleNamespace(flags={"epochs": 2, "lr": 5e-5}, world_size=1)  # written before --loss-norm existed
    check_resume("OUT/checkpoint", saved, {"epochs": 2, "lr": 5e-5, **ADDED_FLAGS}, world_size=1)
    with pytest.raises(CheckpointError, match="changed: --loss-norm batch -> fixed$"):
        check_resume("OUT/checkpoint", saved, {"epochs": 2, "lr": 5e-5, **ADDED_FLAGS, "loss_norm": "fixed"}, 1)
