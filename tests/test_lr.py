"""Layer-wise learning rates, weight-decay rules and the schedule (lr.py)."""

import argparse

import pytest
from conftest import TINY_PLAIN

from support import flags
import freeze
from lr import EMBEDDINGS_SHARE, auto_decay, auto_top_rate, format_groups, lr_factor, param_groups, part_rates
from model import BertConfig, MultiTaskModel, SentenceEncoder
from support.model_folder import load_pretrained


HEAD_RATES = {"ag_head": 1e-3, "ner_head": 1e-3, "project": 1e-3}


def model():
    return MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN), "mean", embed_dim=8))


def test_rates_rise_from_embeddings_through_layers_to_heads():
    rates = part_rates(num_layers=4, lr=1e-4, lr_decay=0.5, head_rates={"ag_head": 1e-3, "ner_head": 2e-3})
    assert rates == {"layer.3": 1e-4, "layer.2": 5e-5, "layer.1": 2.5e-5, "layer.0": 1.25e-5,
                     "embeddings": 6.25e-6, "pooler": 1e-4, "ag_head": 1e-3, "ner_head": 2e-3}
    order = [rates[p] for p in ("embeddings", "layer.0", "layer.1", "layer.2", "layer.3", "ag_head")]
    assert order == sorted(order) and len(set(order)) == len(order)


def test_auto_rates_keep_to_bert_base_practice_and_scale_with_size():
    assert auto_top_rate(768) == pytest.approx(5e-5)  # bert-base, RoBERTa-base, DistilBERT: Devlin et al.'s top
    assert auto_top_rate(384) == pytest.approx(2e-4)  # all-MiniLM-L6-v2: docs/defaults.md
    assert auto_top_rate(1024) == pytest.approx(2.8125e-5)  # bert-large: inside Devlin et al.'s 2e-5..5e-5
    assert auto_top_rate(256) == pytest.approx(3e-4)  # ELECTRA-small's rate: the cap, not 4.5e-4
    assert auto_top_rate(32) == pytest.approx(3e-4)
    assert auto_decay(12) == pytest.approx(0.95, abs=0.002)  # Sun et al.'s decay for bert-base
    assert auto_decay(6) == pytest.approx(0.9)
    for layers in (2, 6, 12, 24):  # whatever the depth, the embeddings get the same share of the top rate
        rates = part_rates(layers, auto_top_rate(768), auto_decay(layers), HEAD_RATES)
        assert rates["embeddings"] / rates[f"layer.{layers - 1}"] == pytest.approx(EMBEDDINGS_SHARE)


def test_auto_flags_resolve_for_the_backbone_and_numbers_stay():
    config = BertConfig(vocab_size=10, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                        intermediate_size=16, max_position_embeddings=8)
    args = argparse.Namespace(lr="auto", lr_decay="auto")
    chose = flags.resolve_auto_rates(args, config)
    assert chose == "auto rates: --lr 0.0002 (hidden size 384), --lr-decay 0.9 (6 layers)"
    assert (args.lr, args.lr_decay) == (pytest.approx(2e-4), pytest.approx(0.9))
    args = argparse.Namespace(lr=3e-5, lr_decay="auto")
    assert flags.resolve_auto_rates(args, config) == "auto rates: --lr-decay 0.9 (6 layers)" and args.lr == 3e-5
    args = argparse.Namespace(lr=3e-5, lr_decay=1.0)
    assert flags.resolve_auto_rates(args, config) is None and (args.lr, args.lr_decay) == (3e-5, 1.0)


def test_every_group_gets_its_formula_rate_and_decay_rule():
    m = model()
    rates = part_rates(2, 3e-5, 0.9, {"ag_head": 5e-4, "ner_head": 1e-3, "project": 5e-4})
    groups = param_groups(m, rates, weight_decay=0.01)
    expected_lr = {"embeddings": 3e-5 * 0.81, "layer.0": 3e-5 * 0.9, "layer.1": 3e-5, "pooler": 3e-5,
                   "ag_head": 5e-4, "ner_head": 1e-3, "project": 5e-4}
    names = {id(p): n for n, p in m.named_parameters()}
    seen = set()
    for g in groups:
        part = g["name"].removesuffix(" (no decay)")
        assert g["base_lr"] == pytest.approx(expected_lr[part])
        for p in g["params"]:
            name = names[id(p)]
            no_decay = name.endswith(".bias") or "norm" in name.split(".")[-2]
            assert g["weight_decay"] == (0.0 if no_decay else 0.01), name
            seen.add(name)
    assert seen == set(names.values())  # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(seen)
    assert [g["name"] for g in groups][:3] == ["embeddings", "embeddings (no decay)", "layer.0"]
    assert "ag_head (no decay)" in format_groups(groups)


def test_groups_hold_trainable_parameters_only():
    m = model()
    freeze.apply_freeze(m, freeze.parse_freeze("lower:1,ner-head", 2, ("ag_head", "ner_head")))
    groups = param_groups(m, part_rates(2, 3e-5, 0.9, HEAD_RATES), 0.01)
    assert {g["name"].removesuffix(" (no decay)") for g in groups} == {"layer.1", "pooler", "ag_head", "project"}
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_schedule_warmup_end_and_last_step():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup) == pytest.approx(0.1)
    assert lr_factor(warmup - 1, total, warmup) == 1.0  # the end of warmup reaches the full rate
    assert lr_factor(warmup, total, warmup) == 1.0
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)
    assert lr_factor(total - 1, total, warmup) == pytest.approx(1 / 90)  # the last step
    assert lr_factor(5, 10, 0) == pytest.approx(0.5)  # no warmup
    factors = [lr_factor(s, total, warmup) for s in range(total)]
    assert factors[:warmup] == sorted(factors[:warmup]) and factors[warmup:] == sorted(factors[warmup:], reverse=True)
