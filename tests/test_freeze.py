"""Freezing strategies (freeze.py): frozen parameters stay bit-identical, trained ones move."""

import pytest
import torch
from conftest import FIXTURES, TINY_PLAIN
from safetensors import safe_open

import freeze
import train
from support.runtime import optimizer_step
from conftest import encode_classification, encode_ner, read_ag_news, read_conll
from data import collate, load_tokenizer
from lr import param_groups, part_rates
from model import MultiTaskModel, SentenceEncoder
from support.model_folder import load_pretrained

DATA = FIXTURES / "data"
ALL_PARTS = {"embeddings", "layer.0", "layer.1", "pooler", "ag_head", "ner_head", "project"}
HEADS = ("ag_head", "ner_head", "project")  # a head per task, and the sentence projection (embed_dim)


@pytest.fixture(scope="module")
def batches():
    tokenizer = load_tokenizer(TINY_PLAIN)
    ag = encode_classification(read_ag_news(DATA / "ag_news" / "train.csv"), tokenizer, 64)
    ner = encode_ner(read_conll(DATA / "conll2003" / "train.txt"), tokenizer, 64)
    return [("ag", collate(ag, [0, 1, 2, 3])), ("ner", collate(ner, [0, 1, 2, 3])), ("ag", collate(ag, [4, 5, 6]))]


def three_steps(spec, batches):
    """Freeze by spec, then take 3 optimizer steps the way train.py does; returns (before, after, model, optimizer)."""
    torch.manual_seed(0)
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN), pool="cls", embed_dim=8))  # cls: the pooler gets gradients
    frozen = freeze.parse_freeze(spec, 2, HEADS)
    freeze.apply_freeze(model, frozen)
    freeze.set_train_mode(model, frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, part_rates(2, 1e-3, 0.9, {"ag_head": 1e-2, "ner_head": 1e-2, "project": 1e-2}), 0.01) or [{"params": []}])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for task, batch in batches:
        loss = train.task_loss(model(batch["input_ids"], batch["attention_mask"], task), batch["labels"], model.tasks[task].level)
        if loss.requires_grad:
            scaler.scale(loss).backward()
            optimizer_step(optimizer, scaler, clip=1.0)
    return before, dict(model.named_parameters()), model, optimizer


@pytest.mark.parametrize("spec, frozen_parts", [
    ("none", set()),
    ("all", ALL_PARTS),
    ("backbone", {"embeddings", "layer.0", "layer.1", "pooler"}),
    ("embeddings", {"embeddings"}),
    ("lower:1", {"embeddings", "layer.0"}),
    ("lower:2", {"embeddings", "layer.0", "layer.1"}),
    ("ag-head", {"ag_head"}),
    ("ner-head", {"ner_head"}),
    ("embeddings,ner-head", {"embeddings", "ner_head"}),
])
def test_frozen_stay_identical_and_trained_change(spec, frozen_parts, batches):
    from model import parameter_part
    before, after, model, optimizer = three_steps(spec, batches)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in after.items():
        if parameter_part(name) in frozen_parts:
            assert torch.equal(p, before[name]), f"{spec}: frozen {name} changed"
            assert id(p) not in in_optimizer and not p.requires_grad
        else:
            assert not torch.equal(p, before[name]), f"{spec}: trainable {name} did not change"
            assert id(p) in in_optimizer
    backbone_frozen = {"embeddings", "layer.0", "layer.1", "pooler"} <= frozen_parts
    assert model.bert.training is not backbone_frozen  # a fully frozen backbone runs without dropout
    assert model.heads["ag"].training


def test_bad_strategies():
    with pytest.raises(ValueError, match="unknown strategy 'top'"):
        freeze.parse_freeze("backbone,top", 2, HEADS)
    with pytest.raises(ValueError, match="'lower:3': N must be a whole number from 1 to 2"):
        freeze.parse_freeze("lower:3", 2, HEADS)


def test_gradual_schedule():
    assert freeze.gradual_frozen(0, 2, set()) == {"embeddings", "layer.0", "layer.1", "pooler"}
    assert freeze.gradual_frozen(1, 2, set()) == {"embeddings", "layer.0"}
    assert freeze.gradual_frozen(2, 2, set()) == {"embeddings"}
    assert freeze.gradual_frozen(3, 2, set()) == set()
    assert freeze.gradual_frozen(9, 2, {"ner_head"}) == {"ner_head"}


def checkpoint_weights(out):
    with safe_open(out / "checkpoint" / "checkpoint.safetensors", "pt") as f:
        return {k.removeprefix("model."): f.get_tensor(k) for k in f.keys() if k.startswith("model.")}


def test_gradual_unfreezing_across_epochs(tmp_path):
    """Epoch 1 trains only the heads, epoch 2 adds the top layer and pooler, epoch 3 layer 0, epoch 4 the embeddings."""
    from model import parameter_part
    out = tmp_path / "run"
    flags = ["--model", str(TINY_PLAIN), "--data", str(DATA), "--out", str(out), "--max-len", "64", "--epochs", "4",
             "--batch-size", "4", "--pool", "cls", "--lr", "1e-3", "--unfreeze", "gradual", "--no-data-cache",
             "--log-every", "100"]
    start = {f"encoder.bert.{k}": v for k, v in load_pretrained(TINY_PLAIN).state_dict().items()}
    previous = start
    expected_moving = [{"ag_head", "ner_head"}, {"ag_head", "ner_head", "layer.1", "pooler"},
                       {"ag_head", "ner_head", "layer.1", "pooler", "layer.0"}, ALL_PARTS]
    for epoch, moving in enumerate(expected_moving, start=1):
        resume = ["--resume"] if epoch > 1 else []
        assert train.main(flags + resume + ["--stop-after", "1"]) == 0  # one more epoch each time
        weights = checkpoint_weights(out)
        for name, value in weights.items():
            if name not in previous:
                continue  # the heads have no value before the first epoch
            changed = not torch.equal(value, previous[name])
            assert changed == (parameter_part(name) in moving), f"epoch {epoch}: {name} changed={changed}"
        previous = weights


def test_plan_gives_each_epoch_its_frozen_parts():
    plan = freeze.Plan.from_flags("ner-head", "gradual", 2, HEADS)
    assert plan.frozen_at(0) == {"embeddings", "layer.0", "layer.1", "pooler", "ner_head"}
    assert plan.frozen_at(3) == {"ner_head"}
    assert plan.trains(1) and not plan.backbone_fixed()
    assert freeze.Plan.from_flags("backbone", "none", 2, HEADS).backbone_fixed()  # its outputs can be stored
    assert not freeze.Plan.from_flags("lower:2", "none", 2, HEADS).backbone_fixed()  # the pooler still trains
    assert not freeze.Plan.from_flags("all", "none", 2, HEADS).trains(5)
    assert freeze.Plan.from_flags("all", "gradual", 2, HEADS).trains(2) is False  # --freeze all wins over unfreezing


def test_a_task_trains_only_where_its_path_has_trainable_parameters():
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN), pool="mean"))
    freeze.apply_freeze(model, freeze.parse_freeze("lower:2,ner-head", 2, HEADS))
    # The pooler still trains, but NER steps never read it, and mean pooling does not either.
    assert freeze.task_trains(model, "ag") and not freeze.task_trains(model, "ner")
    model = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN), pool="cls"))
    freeze.apply_freeze(model, freeze.parse_freeze("lower:2,ag-head", 2, HEADS))
    assert freeze.task_trains(model, "ag")  # with cls pooling the classification path reads the pooler
