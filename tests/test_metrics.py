"""Entity-level scores against seqeval (conlleval semantics), and accuracy."""

import json

import pytest
from conftest import FIXTURES

from support.metrics import accuracy, chunks, entity_counts, entity_f1, scores_from_counts

CASES = json.loads((FIXTURES / "seqeval_cases.json").read_text())


def as_lists(case):
    return [s.split() for s in case["gold"]], [s.split() for s in case["pred"]]


def test_matches_seqeval_golden_on_perturbed_conll():
    assert len(CASES) >= 200
    for case in CASES:
        scores = entity_f1(*as_lists(case))
        for key in ("precision", "recall", "f1"):
            assert abs(scores[key] - case[key]) <= 1e-9, (key, case)
        for kind, expected in case["per_type"].items():
            got = scores["per_type"][kind]
            assert abs(got["f1"] - expected["f1-score"]) <= 1e-9
            assert abs(got["precision"] - expected["precision"]) <= 1e-9
            assert got["support"] == expected["support"]


def test_matches_seqeval_live():
    seqeval = pytest.importorskip("seqeval.metrics")
    for case in CASES[:100]:
        gold, pred = as_lists(case)
        assert abs(entity_f1(gold, pred)["f1"] - seqeval.f1_score(gold, pred, zero_division=0)) <= 1e-9


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O"], {("PER", 0, 1)}),
    (["O", "I-PER", "I-PER"], {("PER", 1, 2)}),  # I- after O opens a chunk, as conlleval allows
    (["I-LOC"], {("LOC", 0, 0)}),  # ... and so does I- at the start
    (["B-PER", "I-ORG", "I-ORG"], {("PER", 0, 0), ("ORG", 1, 2)}),  # a type change inside a chunk splits it
    (["B-LOC", "B-LOC", "I-LOC"], {("LOC", 0, 0), ("LOC", 1, 2)}),  # B- after B- of one type: two chunks
    (["O", "O", "B-MISC"], {("MISC", 2, 2)}),  # a chunk at the sentence end
    (["O", "O"], set()),
])
def test_chunks_edge_cases(tags, expected):
    assert chunks(tags) == expected


def test_hand_computed_scores():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "I-ORG"]]  # PER right; LOC typed ORG; ORG span wrong
    scores = entity_f1(gold, pred)
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scores["per_type"]["LOC"]["recall"] == 0.0 and scores["per_type"]["ORG"]["precision"] == 0.0


def test_counts_from_shards_add_up_to_the_whole():
    gold, pred = as_lists(CASES[0])
    gold, pred = gold * 3, pred * 3
    whole = entity_counts(gold, pred)
    first, second = entity_counts(gold[:2], pred[:2]), entity_counts(gold[2:], pred[2:])
    summed = {k: [a + b for a, b in zip(first.get(k, [0] * 3), second.get(k, [0] * 3))] for k in whole}
    assert summed == whole
    assert scores_from_counts(summed) == entity_f1(gold, pred)


def test_no_entities_and_accuracy():
    assert entity_f1([["O", "O"]], [["O", "O"]])["f1"] == 0.0
    assert accuracy([0, 1, 2, 3], [0, 1, 1, 3]) == 0.75
    with pytest.raises(ValueError, match="3 gold tags but 2 predicted"):
        entity_f1([["O", "O", "O"]], [["O", "O"]])
