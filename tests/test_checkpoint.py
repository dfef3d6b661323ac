"""checkpoint.py: what save writes, read gives back, and the checks --resume makes."""

import pytest
import torch
from conftest import TINY_PLAIN
from safetensors.torch import save_file

import checkpoint
from checkpoint import Checkpoint, Progress
from model import CheckpointError, MultiTaskModel, load_pretrained


def trained_objects():
    torch.manual_seed(0)
    model = MultiTaskModel(load_pretrained(TINY_PLAIN))
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "name": "all", "base_lr": 1e-3}])
    loss = model(torch.randint(5, 99, (2, 7)), torch.ones(2, 7, dtype=torch.long), "ag").sum()
    loss.backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scaler


def test_save_then_read_gives_back_every_part(tmp_path):
    model, optimizer, scaler = trained_objects()
    progress = Progress(run={"seed": 3}, world_size=2, epoch=1, batch=5, step=17, best={"score": 0.5, "epoch": 1},
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
        fresh_model.cls_head.out.weight.zero_()
    assert checkpoint.restore(saved, path, fresh_model, fresh_optimizer, fresh_scaler, rank=1) == progress
    assert torch.equal(torch.get_rng_state(), rngs[1]["torch"])
    assert torch.equal(fresh_model.cls_head.out.weight, model.cls_head.out.weight)


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
    progress = Progress(run={"seed": 0, "batch_size": 4, "out": "a", "log_every": 5}, world_size=1)
    checkpoint.check_resume("ck", progress, {"seed": 0, "batch_size": 4, "out": "b", "log_every": 1}, 1)
    with pytest.raises(CheckpointError, match=r"ck: --resume needs the flags of the saved run; changed: "
                                              r"--seed 0 -> 1; --batch-size 4 -> 8"):
        checkpoint.check_resume("ck", progress, {"seed": 1, "batch_size": 8, "out": "a", "log_every": 5}, 1)
    with pytest.raises(CheckpointError, match="ck was written by 1 processes, this run has 2"):
        checkpoint.check_resume("ck", progress, {"seed": 0, "batch_size": 4, "out": "a", "log_every": 5}, 2)
