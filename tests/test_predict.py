"""predict.py: a trained run folder on new text, checked against train.evaluate's predictions."""

import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, TINY_PLAIN

import predict
import train
from conftest import encode_classification, encode_ner, read_conll
from data import Batching, load_tokenizer
from support.metrics import chunks
from model import MultiTaskModel, SentenceEncoder
from support.model_folder import load_pretrained
from support.runtime import Place

DATA = FIXTURES / "data"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    argv = ["--model", str(TINY_PLAIN), "--data", str(DATA), "--out", str(out), "--max-len", "64", "--batch-size", "4",
            "--no-data-cache", "--epochs", "1", "--lr", "1e-3", "--head-lr", "1e-2"]
    assert train.main(argv) == 0
    return out


def test_split_words_keeps_spans_and_splits_punctuation_off():
    text = "(Apple's) U.S. co-founder moved to London... Zürich?!"
    words = predict.split_words(text)
    assert [w for w, _, _ in words] == ["(", "Apple", "'s", ")", "U.S.", "co-founder", "moved", "to", "London", ".",
                                        ".", ".", "Zürich", "?", "!"]
    assert all(text[start:end] == word for word, start, end in words)


def test_tags_equal_what_evaluate_predicts_for_the_same_words(monkeypatch):
    """Each CoNLL test sentence, written as text: predict.py's entities are the chunks of the tags
    that train.evaluate computes for the same words. Untrained heads: they tag plenty of entities."""
    sentences = read_conll(DATA / "conll2003" / "test.txt")
    texts = [" ".join(words) for words, _ in sentences]
    assert all([w for w, _, _ in predict.split_words(t)] == words for t, (words, _) in zip(texts, sentences))
    recorded = {}
    original = train.word_tags

    def recording(pieces, first_piece, labels):  # evaluate calls it once per sentence, with its own list
        tags = original(pieces, first_piece, labels)
        recorded[id(first_piece)] = tags
        return tags

    monkeypatch.setattr(train, "word_tags", recording)
    torch.manual_seed(0)
    model, tokenizer = MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN))), load_tokenizer(TINY_PLAIN)
    ner = encode_ner(sentences, tokenizer, 64)
    ag = encode_classification([], tokenizer, 64)
    train.evaluate(model, {"ag": ag, "ner": ner}, Place(torch.device("cpu")), Batching(8, tokenizer.token_to_id("[PAD]")))
    results = predict.predict(model, tokenizer, texts, 64)
    tagged = 0
    for text, (words, _), first, result in zip(texts, sentences, ner.first_piece, results):
        tags = recorded[id(first)]
        tagged += sum(tag != "O" for tag in tags)
        spans = predict.split_words(text)
        expected = [(kind, spans[a][1], spans[b][2]) for kind, a, b in sorted(chunks(tags), key=lambda c: c[1])]
        assert [(e["type"], e["start"], e["end"]) for e in result["entities"]] == expected
        assert all(text[e["start"]:e["end"]] == e["text"] for e in result["entities"])
    assert tagged > 0  # the comparison covers entities, not only O


def test_json_output_parses_with_offsets_into_the_input(run_dir, capsys):
    texts = ["Apple opened a store in London.", "  Germany's  EU envoy , Werner Zwingmann ( 43 )"]
    assert predict.main(["--model", str(run_dir), "--json", *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for text, line in zip(texts, lines):
        result = json.loads(line)
        assert set(result) == {"text", "topic", "topic_scores", "entities"} and result["text"] == text
        assert list(result["topic_scores"]) == ["World", "Sports", "Business", "Sci/Tech"]
        assert sum(result["topic_scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert result["topic"] == max(result["topic_scores"], key=result["topic_scores"].get)
        for entity in result["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"] and entity["type"] in {"PER", "ORG", "LOC",
                                                                                                 "MISC"}


def test_stdin_and_readable_output(run_dir):
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--model", str(run_dir)], cwd=ROOT,
                            input="Apple opened a store in London.\n\nRain in Spain .\n", capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "Apple opened a store in London." and lines[3] == "Rain in Spain ."
    assert lines[1].startswith("  topic: ") and lines[2].startswith("  entities: ") and len(lines) == 6


def test_a_text_past_max_len_is_cut_with_a_warning(run_dir, capsys):
    words = ["Paris", "and", "London"] * 10
    kept = encode_ner([(words, ["O"] * 30)], load_tokenizer(run_dir), 12).first_piece[0]
    n_cut = sum(p < 0 for p in kept)
    assert 0 < n_cut < 30
    text = " ".join(words)
    assert predict.main(["--model", str(run_dir), "--max-len", "12", "--json", text]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: text 1 is longer than 12 word pieces: cut there; its last {n_cut} words "
                            "get no entity tags\n")
    end_of_kept = len(" ".join(words[:30 - n_cut]))
    assert all(e["end"] <= end_of_kept for e in json.loads(captured.out)["entities"])


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent/run", "text"], "error: argument --model: /nonexistent/run is not a folder"),
    (["--model", str(TINY_PLAIN), "text"], "has no 'multitask' settings; it is a plain BERT folder"),
    (["--max-len", "999", "text"], "error: argument --max-len: 999 is more than the model's max_position_embeddings"),
    (["--max-len", "2", "text"], "error: argument --max-len: must be at least 3, got 2"),
    (["--max-len", "0", "text"], "error: argument --max-len: must be at least 3, got 0"),
    (["--max-len", "-1", "text"], "error: argument --max-len: must be at least 3, got -1"),
    (["a text", "  "], "error: text 2 is empty"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, extra, message):
    argv = extra if extra[0] == "--model" else ["--model", str(run_dir), *extra]
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                            check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("texts, stdin, message", [
    ([b"Apple opened a store.", b"caf\xe9 in Paris"], None, "error: text 2: not UTF-8 text (byte 0xe9)\n"),
    ([], b"Apple opened a store.\n\ncaf\xe9 in Paris\n", "error: <stdin>:3: not UTF-8 text (byte 0xe9)\n"),
])
def test_text_that_is_not_utf8_is_one_line_and_exit_2(run_dir, texts, stdin, message):
    """An argument's bytes reach Python as a str with surrogates in it, stdin's as bytes; both are named."""
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--model", str(run_dir), *texts], cwd=ROOT,
                            input=stdin, capture_output=True, check=False)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode() == message and "Traceback" not in result.stderr.decode()


def test_stdin_line_endings_and_byte_order_mark_are_not_part_of_the_text(run_dir, capsys, monkeypatch):
    """A file a Windows editor saved: a byte-order mark, then lines ending in "\r\n". The results are
    those of the same texts given as arguments."""
    texts = ["Apple opened a store in London.", "Rain in Spain ."]
    assert predict.main(["--model", str(run_dir), "--json", *texts]) == 0
    expected = capsys.readouterr().out
    saved = ("\ufeff" + "\r\n\r\n".join(texts) + "\r\n").encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(saved)))
    assert predict.main(["--model", str(run_dir), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == expected
    assert [json.loads(line)["text"] for line in captured.out.splitlines()] == texts


def test_help_gives_every_flag_a_text_and_no_empty_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--max-len MAX_LEN word pieces per text, [CLS] and [SEP] included (default: the run's --max-len) " in text
    assert "--batch-size BATCH_SIZE texts per forward pass (default: 32) " in text
    assert "--device {auto,cpu,cuda} auto: cuda where there is one (default: auto)" in text
    assert "--json one JSON object per text instead of readable lines --max-len" in text


def test_the_run_folder_is_a_complete_model_folder(run_dir):
    assert (run_dir / "tokenizer.json").exists() or (run_dir / "vocab.txt").exists()
    assert load_tokenizer(run_dir).to_str() == load_tokenizer(TINY_PLAIN).to_str()


def test_tools_end_environment_failures_in_one_line(capsys):
    """predict.py, embed.py, bench.py and data.py run main() through runtime.exit_status_of."""
    from support.runtime import exit_status_of

    def full():
        raise OSError(28, "No space left on device", "/out/vectors.json")

    def interrupted():
        raise KeyboardInterrupt

    def bug():
        raise ZeroDivisionError("a bug keeps its traceback")

    assert exit_status_of(full) == 2
    assert capsys.readouterr().err == "error: /out/vectors.json: No space left on device\n"
    assert exit_status_of(interrupted) == 130
    assert capsys.readouterr().err == "stopped by signal 2\n"
    with pytest.raises(ZeroDivisionError):
        exit_status_of(bug)
    for script in ("predict.py", "embed.py", "bench.py"):
        assert "sys.exit(exit_status_of(main))" in (ROOT / script).read_text(), script
    assert "sys.exit(exit_status_of(lambda: data_summary.main(" in (ROOT / "data.py").read_text()
