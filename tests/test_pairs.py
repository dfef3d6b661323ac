"""Sentence pairs (STS-B): reading the files, the pair encoding, rank correlation, and pairs.py's two encoders."""

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from conftest import FIXTURES, ROOT, TINY_PLAIN
from safetensors import safe_open

import embed
import pairs
from data import DataError, load_tokenizer
from support.sentence_pairs import encode_pairs, read_stsb
from support.metrics import pearson, ranks, spearman
from support.sentence_pairs import PairModel, cosine, load_pairs
from model import SentenceEncoder
from support.model_folder import load_pretrained

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


# --- The model, the loss, training (pairs.py) ----------------------------------------------

PAIR_LOSS = pairs.pair_loss


def test_cosine_and_both_losses_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[4.0, 3.0], [-2.0, 0.0], [1.0, 1.0]])
    cos = cosine(a, b)
    # (12 + 12) / (5 * 5); opposite directions; a zero row scores 0 instead of NaN
    assert cos.tolist() == pytest.approx([24 / 25, -1.0, 0.0], abs=1e-7)
    assert cosine(a[:2], b[:2]).tolist() == pytest.approx(torch.cosine_similarity(a[:2], b[:2]).tolist(), abs=1e-7)
    scores = torch.tensor([5.0, 0.0, 2.5])  # targets 1, 0, 0.5
    mse = ((24 / 25 - 1) ** 2 + (-1 - 0) ** 2 + (0 - 0.5) ** 2) / 3
    assert PAIR_LOSS(cos, scores, "bi").item() == pytest.approx(mse, rel=1e-6)
    logits = torch.tensor([2.0, -1.0, 0.0])

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = (bce(2.0, 1.0) + bce(-1.0, 0.0) + bce(0.0, 0.5)) / 3
    assert PAIR_LOSS(logits, scores, "cross").item() == pytest.approx(expected, rel=1e-6)
    # a data-parallel share: the sum over its 3 pairs, divided by (global batch / ranks) = 6 / 2
    assert PAIR_LOSS(logits, scores, "cross", 3.0).item() == pytest.approx(expected, rel=1e-6)


def pair_flags(out, encoder, *extra):
    return ["--encoder", encoder, "--model", str(TINY_PLAIN), "--data", str(FIXTURES / "data"), "--out", str(out),
            "--max-len", "32", "--batch-size", "4", "--log-every", "1", *map(str, extra)]


def run_recording_losses(monkeypatch, argv, interrupt_at=None):
    losses = []

    def recording(outputs, scores, kind, normalizer=None):
        loss = PAIR_LOSS(outputs, scores, kind, normalizer)
        losses.append(loss.item())
        if len(losses) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(pairs, "pair_loss", recording)
    code = pairs.main(argv)
    return code, losses


def dev_scores_by_hand(model_dir, encoder):
    """Dev predictions computed without pairs.py: embeddings from SentenceEncoder.encode, or the cross model."""
    dev = read_stsb(STSB / "sts-dev.csv")
    tokenizer = load_tokenizer(model_dir)
    if encoder == "bi":
        sentence = load_pairs(model_dir).encoder.eval()
        a = sentence.encode([x for x, _, _ in dev], tokenizer, max_len=32)
        b = sentence.encode([y for _, y, _ in dev], tokenizer, max_len=32)
        predicted = cosine(a, b).tolist()
    else:
        predicted = cross_predictions(model_dir, dev)
    return spearman(predicted, [s for _, _, s in dev]), pearson(predicted, [s for _, _, s in dev])


@pytest.mark.parametrize("encoder", ["bi", "cross"])
def test_two_steps_change_the_weights_and_write_the_summary(tmp_path, monkeypatch, encoder):
    out = tmp_path / encoder
    code, losses = run_recording_losses(monkeypatch, pair_flags(out, encoder, "--epochs", 1, "--lr", "1e-3",
                                                                "--head-lr", "1e-3", "--warmup", 0))
    assert code == 0 and len(losses) == 2  # 6 training pairs in batches of 4: 2 steps
    before, after = load_pretrained(TINY_PLAIN).state_dict(), load_pairs(out).bert.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "layers.0.attn.qkv.weight" in changed and "embeddings.word.weight" in changed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder"] == encoder and summary["best_epoch"] == 1 and "test" not in summary
    rho, r = dev_scores_by_hand(out, encoder)
    assert summary["dev"]["spearman"] == pytest.approx(rho, abs=1e-6)
    assert summary["dev"]["pearson"] == pytest.approx(r, abs=1e-5)
    unit = "sentences_per_s" if encoder == "bi" else "pairs_per_s"
    assert summary["inference"][unit] > 0 and summary["timings_s"]["train"] > 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["spearman"] == summary["dev"]["spearman"] and record["step"] == 2


def test_zero_epochs_scores_the_model_as_it_is(tmp_path):
    out = tmp_path / "zero"
    assert pairs.main(pair_flags(out, "bi", "--epochs", 0)) == 0
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(TINY_PLAIN / "model.safetensors", "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in g.keys() if not k.startswith("cls."))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] is None and summary["timings_s"]["train"] == 0
    dev = read_stsb(STSB / "sts-dev.csv")
    tokenizer, sentence = load_tokenizer(TINY_PLAIN), SentenceEncoder(load_pretrained(TINY_PLAIN), "mean")
    cos = cosine(sentence.encode([a for a, _, _ in dev], tokenizer), sentence.encode([b for _, b, _ in dev], tokenizer))
    assert summary["dev"]["spearman"] == pytest.approx(spearman(cos.tolist(), [s for _, _, s in dev]), abs=1e-6)


@pytest.mark.parametrize("encoder", ["bi", "cross"])
def test_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch, encoder):
    """--stop-after, then a SIGINT mid-epoch: the resumed run takes the uninterrupted run's steps, loss by loss."""
    common = ("--epochs", 3, "--lr", "1e-3", "--head-lr", "1e-3", "--unfreeze", "gradual",
              *(("--embed-dim", 8) if encoder == "bi" else ()))  # gradual trains a head first: the projection
    _, straight = run_recording_losses(monkeypatch, pair_flags(tmp_path / "a", encoder, *common))
    assert len(straight) == 6
    code, first = run_recording_losses(monkeypatch, pair_flags(tmp_path / "b", encoder, *common, "--stop-after", 1))
    assert code == 0 and len(first) == 2
    code, second = run_recording_losses(monkeypatch, pair_flags(tmp_path / "b", encoder, *common, "--resume"),
                                        interrupt_at=1)  # stopped after the first step of epoch 2
    assert code == 128 + signal.SIGINT
    code, rest = run_recording_losses(monkeypatch, pair_flags(tmp_path / "b", encoder, *common, "--resume"))
    assert code == 0
    assert first + second + rest == straight
    a, b = (load_pairs(tmp_path / run).state_dict() for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def data_folder(tmp_path, train_text):
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "sts-train.csv").write_text(train_text)
    (tmp_path / "stsb" / "sts-dev.csv").write_text((STSB / "sts-dev.csv").read_text())
    return tmp_path


@pytest.mark.parametrize("text, message", [
    ("main\tf\t2012\t1\t2.0\ta\tb\nmain\tf\t2012\t2\t3.0\tonly one\n", "sts-train.csv:2: expected 7 tab-separated"),
    ("main\tf\t2012\t1\tmany\ta\tb\n", "sts-train.csv:1: the score 'many' is not a number"),
    ("main\tf\t2012\t1\t7\ta\tb\n", "sts-train.csv:1: the score 7 is outside 0-5"),
    ("", "sts-train.csv: empty file"),
])
def test_bad_data_ends_in_one_line_and_status_2(tmp_path, capsys, text, message):
    data = data_folder(tmp_path, text)
    argv = pair_flags(tmp_path / "out", "bi")
    argv[argv.index("--data") + 1] = str(data)
    assert pairs.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.parametrize("extra, message", [
    (("--pool", "max"), "argument --pool: only for --encoder bi"),
    (("--freeze", "ner-head"), "argument --freeze: this cross-encoder has no NER head"),
    (("--epochs", "-1"), "argument --epochs: must be at least 0"),
])
def test_bad_flags_end_in_one_line_and_status_2(tmp_path, capsys, extra, message):
    assert pairs.main(pair_flags(tmp_path / "out", "cross", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_missing_dev_file_names_the_download(tmp_path, capsys):
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "sts-train.csv").write_text((STSB / "sts-train.csv").read_text())
    argv = pair_flags(tmp_path / "out", "bi")
    argv[argv.index("--data") + 1] = str(tmp_path)
    assert pairs.main(argv) == 2
    assert "sts-dev.csv: not found; run `python download.py --only stsb`" in capsys.readouterr().err


def test_embed_reads_a_trained_bi_encoder_and_refuses_a_cross_encoder(tmp_path, capsys):
    out = tmp_path / "bi"
    assert pairs.main(pair_flags(out, "bi", "--epochs", 1, "--lr", "1e-3", "--pool", "max", "--embed-dim", 8,
                                 "--normalize", "l2")) == 0
    capsys.readouterr()
    sentences = ["A cat sits on a mat.", "A boy rides a bike."]
    assert embed.main(["--model", str(out), "--json", *sentences]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["pool"], shown["normalize"], shown["embed_dim"]) == ("max", "l2", 8)
    expected = load_pairs(out).encoder.encode(sentences, load_tokenizer(out), max_len=shown["max_len"])
    assert torch.allclose(torch.tensor(shown["embeddings"]), expected, atol=1e-6)
    assert embed.main(["--model", str(out), "--embed-dim", "4", "a"]) == 2
    assert "trained with --embed-dim 8" in capsys.readouterr().err
    cross = tmp_path / "cross"
    assert pairs.main(pair_flags(cross, "cross", "--epochs", 0)) == 0
    capsys.readouterr()
    assert embed.main(["--model", str(cross), "a"]) == 2
    err = capsys.readouterr().err
    assert "holds a cross-encoder" in err and err.count("\n") == 1  # the error alone, no note before it


def test_the_cross_encoder_model_reads_segments():
    """The same ids with other segment ids give another logit: the pair template reaches the encoder."""
    torch.manual_seed(0)
    model = PairModel(load_pretrained(TINY_PLAIN), "cross").eval()
    ids = torch.tensor([[2, 7, 8, 3, 9, 10, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    zero = model(batch)
    batch["token_type_ids"] = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    assert not torch.allclose(zero, model(batch))


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_train_as_cross_encoders(tmp_path, capsys, family):
    """RoBERTa's pair template has no segments and DistilBERT no token types nor pooler: both still train,
    and their folders load back with the trained head."""
    folder = FIXTURES / f"tiny_{family}_plain"
    argv = pair_flags(tmp_path / family, "cross", "--epochs", 1, "--lr", "1e-3", "--head-lr", "1e-3")
    argv[argv.index("--model") + 1] = str(folder)
    assert pairs.main(argv) == 0
    model = load_pairs(tmp_path / family)
    assert model.bert.config.model_type == family
    before = load_pretrained(folder).state_dict()
    assert not torch.equal(before["layers.0.attn.qkv.weight"], model.bert.state_dict()["layers.0.attn.qkv.weight"])
    summary = json.loads((tmp_path / family / "summary.json").read_text())
    dev = read_stsb(STSB / "sts-dev.csv")
    expected = spearman(cross_predictions(tmp_path / family, dev), [s for _, _, s in dev])
    assert summary["dev"]["spearman"] == pytest.approx(expected, abs=1e-6)


def cross_predictions(model_dir, dev):
    """The saved cross-encoder's sigmoid scores, one pair at a time (no padding, no batching)."""
    model, data = load_pairs(model_dir).eval(), encode_pairs(dev, load_tokenizer(model_dir), 32)
    with torch.no_grad():
        return [torch.sigmoid(model({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids)),
                                     "token_type_ids": torch.tensor([types])})).item()
                for ids, types in zip(data.input_ids, data.token_type_ids)]


def test_a_test_file_is_scored_too(tmp_path):
    """With sts-test.csv present, summary.json holds its scores as well (here the dev pairs, reversed)."""
    data = data_folder(tmp_path, (STSB / "sts-train.csv").read_text())
    dev_lines = (STSB / "sts-dev.csv").read_text().splitlines()
    (data / "stsb" / "sts-test.csv").write_text("\n".join(reversed(dev_lines)) + "\n")
    argv = pair_flags(tmp_path / "out", "cross", "--epochs", 1)
    argv[argv.index("--data") + 1] = str(data)
    assert pairs.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    test = read_stsb(data / "stsb" / "sts-test.csv")
    expected = spearman(cross_predictions(tmp_path / "out", test), [s for _, _, s in test])
    assert summary["test"]["spearman"] == pytest.approx(expected, abs=1e-6)
    assert summary["test"]["spearman"] == pytest.approx(summary["dev"]["spearman"], abs=1e-6)  # the same pairs


def test_an_undefined_spearman_never_wins_the_best_epoch():
    # undefined is None (null in JSON); it scores below the lowest Spearman there is, and is a JSON number
    undefined, lowest, low = (pairs.dev_score({"spearman": s}) for s in (None, -1.0, -0.5))
    assert undefined < lowest < low
    assert math.isfinite(pairs.dev_score({"spearman": None}))


@pytest.mark.parametrize("encoder, extra, message", [
    ("bi", ("--freeze", "cls-head"), "argument --freeze: this bi-encoder has no head (give --embed-dim"),
    ("bi", ("--unfreeze", "gradual"), "argument --unfreeze: gradual starts by training the heads alone"),
])
def test_freezing_what_a_bi_encoder_lacks_is_refused(tmp_path, capsys, encoder, extra, message):
    assert pairs.main(pair_flags(tmp_path / "out", encoder, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("encoder", ["bi", "cross"])
def test_freeze_all_scores_the_model_as_it_is(tmp_path, encoder):
    out = tmp_path / encoder
    assert pairs.main(pair_flags(out, encoder, "--freeze", "all")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] is None and summary["parameters"]["trainable"] == 0
