"""Sentence pairs (STS-B): reading the files, the cross-encoder's pair encoding, and rank correlation."""

import json
import math

import numpy as np
import pytest
from conftest import FIXTURES, ROOT

from data import DataError, encode_pairs, load_tokenizer, read_stsb
from metrics import pearson, ranks, spearman

STSB = FIXTURES / "data" / "stsb"
SHARED = ROOT.parent / "shared" / "data" / "stsb"  # the real files, where they are present
CASES = json.loads((FIXTURES / "family_tokenizer_cases.json").read_text())


def test_reads_nine_column_lines_lone_quotes_and_crlf():
    pairs = read_stsb(STSB / "sts-train.csv")
    assert len(pairs) == 6
    assert pairs[0] == ("A plane is taking off.", "An air plane is taking off.", 5.0)
    assert pairs[2] == ('A dog in a "red coat sleeps.', "A dog wearing a coat is asleep.", 3.4)  # a lone quote
    assert pairs[3] == ("Rain delays the final in Paris", "Rain delays Paris final", 4.0)  # 9 columns
    assert [score for _, _, score in pairs] == [5.0, 0.5, 3.4, 4.0, 2.2, 1.5]


@pytest.mark.skipif(not SHARED.exists(), reason="the real STS-B files are absent")
def test_the_real_files():
    train, dev = read_stsb(SHARED / "sts-train.csv"), read_stsb(SHARED / "sts-dev.csv")
    assert (len(train), len(dev)) == (5_749, 1_500)
    nine = [line for line in (SHARED / "sts-train.csv").read_text().splitlines() if line.count("\t") == 8]
    assert len(nine) == 197
    assert all(0 <= s <= 5 for _, _, s in train + dev) and all(a and b for a, b, _ in train + dev)
    quoted = [a for a, b, _ in train if a.count('"') % 2 or b.count('"') % 2]
    assert quoted  # lines with a lone quote, read as they are


@pytest.mark.parametrize("line, message", [
    ("main\tfile\t2012\t0001\t5.0\tonly one sentence", "expected 7 tab-separated columns (genre, file, year, id, "
                                                         "score, sentence 1, sentence 2), found 6"),
    ("main\tfile\t2012\t0001\tfive\ta\tb", "the score 'five' is not a number"),
    ("main\tfile\t2012\t0001\t5.5\ta\tb", "the score 5.5 is outside 0-5"),
    ("main\tfile\t2012\t0001\t-0.1\ta\tb", "the score -0.1 is outside 0-5"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "sts-train.csv"
    path.write_text("main\tfile\t2012\t0000\t1.0\ta\tb\n" + line + "\n")
    with pytest.raises(DataError) as e:
        read_stsb(path)
    assert str(e.value) == f"{path}:2: {message}"


def test_an_empty_file(tmp_path):
    (tmp_path / "sts-dev.csv").write_text("\n\n")
    with pytest.raises(DataError, match="sts-dev.csv: empty file"):
        read_stsb(tmp_path / "sts-dev.csv")


def test_pair_encoding_equals_transformers():
    """[CLS] a [SEP] b [SEP] with segment ids 0 then 1, truncated longest first, as BertTokenizerFast does."""
    tokenizer = load_tokenizer(FIXTURES / "bert_vocab")
    cases = CASES["bert_pairs"]
    data = encode_pairs([(c["a"], c["b"], 0.0) for c in cases], tokenizer, 24)
    assert data.input_ids == [c["ids"] for c in cases]
    assert data.token_type_ids == [c["type_ids"] for c in cases]
    assert data.truncated[-1] and not data.truncated[0]


def test_live_pair_encoding_against_transformers():
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizerFast.from_pretrained(str(FIXTURES / "bert_vocab"), do_lower_case=True)
    pairs = read_stsb(STSB / "sts-train.csv") + read_stsb(STSB / "sts-dev.csv")
    data = encode_pairs(pairs, load_tokenizer(FIXTURES / "bert_vocab"), 16)
    for (a, b, _), ids, types in zip(pairs, data.input_ids, data.token_type_ids):
        expected = reference(a, b, truncation="longest_first", max_length=16)
        assert (ids, types) == (expected["input_ids"], expected["token_type_ids"])


def test_ranks_average_ties():
    assert ranks([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    assert ranks([3.0, 1.0, 2.0]).tolist() == [3.0, 1.0, 2.0]


def test_correlations_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # Pearson: dx = [-1.5, -0.5, 0.5, 1.5], dy = [-1.75, 0.25, 1.25, 0.25]; sum dx*dy = 3.5,
    # sum dx^2 = 5, sum dy^2 = 4.75
    assert pearson(x, y) == pytest.approx(3.5 / math.sqrt(5 * 4.75), abs=1e-12)
    # Spearman: ranks of y with the tie averaged are [1, 2.5, 4, 2.5]
    assert spearman(x, y) == pytest.approx(pearson([1, 2, 3, 4], [1, 2.5, 4, 2.5]), abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_live_correlations_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (5, 50, 1500):
        x = rng.integers(0, 6, n).astype(float)  # many ties, as STS-B's scores have
        y = x + rng.normal(0, 1.5, n).round(1)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
