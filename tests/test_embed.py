"""embed.py, the Task 1 command line: its output, and its errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import BROKEN, FIXTURES, ROOT, TINY_PLAIN, broken_copy

import embed
from data import load_tokenizer
from model import SentenceEncoder
from support.model_folder import load_pretrained

SENTENCES = ["the cat sat on the mat", "the dog sat on the rug", "stocks fell"]


def run_embed(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "embed.py"), *map(str, args)], input=stdin, check=False,
                          capture_output=True, text=True, cwd=ROOT)


def expected_vectors(pool, norm, embed_dim=None, seed=0, sentences=SENTENCES):
    torch.manual_seed(seed)  # embed.py seeds before it builds the projection
    encoder = SentenceEncoder(load_pretrained(TINY_PLAIN), pool, embed_dim, norm)
    return encoder.encode(sentences, load_tokenizer(TINY_PLAIN))


def nearest_by_brute_force(vectors):
    """For each row, the index and cosine of the most similar other row, from the whole N x N matrix."""
    cos = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=2)
    cos.fill_diagonal_(float("-inf"))
    best, nearest = cos.max(dim=1)
    return nearest.tolist(), best.tolist()


def check_nearest_rows(rows, sentences, vectors):
    """Rows "[i]   [j]   0.912  sentence": j and the cosine are the brute-force nearest of sentence i."""
    nearest, best = nearest_by_brute_force(vectors)
    assert len(rows) == len(sentences)
    for i, row in enumerate(rows):
        label, other, cosine, text = row.split(maxsplit=3)
        assert (label, other, text) == (f"[{i}]", f"[{nearest[i]}]", sentences[i])
        assert float(cosine) == pytest.approx(best[i], abs=6e-4)  # printed to 3 decimals


def test_json_output_equals_the_library():
    result = run_embed("--model", TINY_PLAIN, "--pool", "max", "--normalize", "l2", "--json", *SENTENCES)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["pool"], out["normalize"], out["embed_dim"], out["sentences"]) == ("max", "l2", 32, SENTENCES)
    got = torch.tensor(out["embeddings"])
    assert (got - expected_vectors("max", "l2")).abs().max() <= 1e-6


def test_similarity_matrix_printout():
    result = run_embed("--model", TINY_PLAIN, "--pool", "mean", *SENTENCES)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "embedding size: 32 (pool=mean, normalize=none, max_len=64, 3 sentences, cpu)"
    vectors = expected_vectors("mean", "none")
    cos = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=2)
    for i in range(3):
        row = [float(x) for x in lines[2 + i].split()[1:]]
        assert row == [round(c, 3) for c in cos[i].tolist()]
    assert lines[5:] == [f"[{i}] {s}" for i, s in enumerate(SENTENCES)]


def test_projection_is_seeded_and_sentences_come_from_stdin():
    args = ("--model", TINY_PLAIN, "--embed-dim", 8, "--seed", 7, "--json")
    first = json.loads(run_embed(*args, *SENTENCES).stdout)
    second = json.loads(run_embed(*args, stdin="\n".join(SENTENCES) + "\n").stdout)
    assert first == second
    got = torch.tensor(first["embeddings"])
    assert got.shape == (3, 8)
    assert (got - expected_vectors("mean", "none", embed_dim=8, seed=7)).abs().max() <= 1e-6


def test_past_the_table_limit_each_sentence_gets_its_nearest(capsys):
    """TABLE_LIMIT sentences still get the table of every pair; one more, a line per sentence with its nearest."""
    words = ["the cat sat", "the dog sat", "on the mat", "on the rug", "stocks fell", "stocks rose", "the team won"]
    sentences = [f"{a} {b}" for a in words[:2] for b in words[2:]] + words[2:]
    assert len(sentences) > embed.TABLE_LIMIT
    assert embed.main(["--model", str(TINY_PLAIN), *sentences[:embed.TABLE_LIMIT]]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2 + 2 * embed.TABLE_LIMIT  # a header line, then the table
    assert embed.main(["--model", str(TINY_PLAIN), *sentences]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + len(sentences)
    assert lines[0] == f"embedding size: 32 (pool=mean, normalize=none, max_len=64, {len(sentences)} sentences, cpu)"
    assert lines[1] == ("more than 12 sentences: the nearest other sentence of each, instead of a table of every "
                        "pair; --json > FILE writes the vectors")
    assert lines[2] == "      nearest  cosine"
    check_nearest_rows(lines[3:], sentences, expected_vectors("mean", "none", sentences=sentences))


def test_nearest_table_in_blocks_equals_the_whole_matrix(monkeypatch):
    """Blocks of 3 rows (the last one shorter) find what the whole N x N matrix finds."""
    torch.manual_seed(0)
    vectors = torch.randn(50, 8)
    sentences = [f"sentence {i}" for i in range(50)]
    monkeypatch.setattr(embed, "BLOCK", 3 * 50)
    lines = embed.nearest_table(sentences, vectors).splitlines()
    assert lines[0] == "      nearest  cosine"
    check_nearest_rows(lines[1:], sentences, vectors)


@pytest.mark.parametrize("case", BROKEN)
def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path, case):
    folder, expected = broken_copy(tmp_path, case)
    result = run_embed("--model", folder, "hello")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {expected}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--pool", "median"], "argument --pool: invalid choice: 'median'"),
    (["--max-len", "1"], "argument --max-len: must be at least 2, got 1"),
    (["--max-len", "65"], "error: argument --max-len: 65 is more than the model's max_position_embeddings (64)"),
    (["--embed-dim", "0"], "argument --embed-dim: must be at least 1, got 0"),
])
def test_bad_flags_exit_2(args, message):
    result = run_embed("--model", TINY_PLAIN, *args, "hello")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_no_sentences_is_an_error():
    result = run_embed("--model", TINY_PLAIN, stdin="")
    assert result.returncode == 2
    assert result.stderr == "error: no sentences given (pass them as arguments or on stdin)\n"


def test_config_and_input_problems_are_one_line(tmp_path):
    """Problems beyond the weights file: bad config values, a tokenizer larger than the model, bad stdin."""
    cases = []
    for key, value in [("num_attention_heads", 0), ("hidden_size", "32"), ("layer_norm_eps", None)]:
        folder = tmp_path / key
        shutil.copytree(TINY_PLAIN, folder)
        raw = json.loads((folder / "config.json").read_text())
        raw[key] = value
        (folder / "config.json").write_text(json.dumps(raw))
        cases.append((folder, f"{folder / 'config.json'}: {key} must be"))
    folder = tmp_path / "list"
    shutil.copytree(TINY_PLAIN, folder)
    (folder / "config.json").write_text("[]")
    cases.append((folder, f"{folder / 'config.json'}: expected a JSON object, found list"))
    folder = tmp_path / "big_vocab"
    shutil.copytree(TINY_PLAIN, folder)
    shutil.copyfile(FIXTURES / "bert_vocab" / "vocab.txt", folder / "vocab.txt")
    cases.append((folder, f"{folder}: the tokenizer has 30522 entries, more than vocab_size 101 in config.json"))
    cases.append((tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: model folder not found"))
    for folder, message in cases:
        result = run_embed("--model", folder, "hello")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1
    result = subprocess.run([sys.executable, str(ROOT / "embed.py"), "--model", str(TINY_PLAIN)],
                            input=b"caf\xe9\n", capture_output=True, check=False)
    assert result.returncode == 2
    assert result.stderr.decode() == "error: standard input: not UTF-8 text (byte 0xe9)\n"


def test_an_argument_that_is_not_utf8_is_one_line():
    """Python hands over an argument's bytes that are not UTF-8 as a str with surrogates in it."""
    result = subprocess.run([sys.executable, str(ROOT / "embed.py"), "--model", str(TINY_PLAIN), "fine", b"caf\xe9"],
                            capture_output=True, check=False)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode() == "error: sentence 2: not UTF-8 text (byte 0xe9)\n"
    assert "Traceback" not in result.stderr.decode()


def test_stdin_line_endings_and_byte_order_mark_are_not_part_of_a_sentence():
    saved = ("\ufeff" + "\r\n".join(SENTENCES) + "\r\n").encode()
    result = subprocess.run([sys.executable, str(ROOT / "embed.py"), "--model", str(TINY_PLAIN), "--json"],
                            input=saved, capture_output=True, check=False)
    assert result.returncode == 0 and result.stderr == b""
    out = json.loads(result.stdout)
    assert out["sentences"] == SENTENCES
    assert (torch.tensor(out["embeddings"]) - expected_vectors("mean", "none")).abs().max() <= 1e-6


def test_help_gives_every_flag_a_text_and_no_empty_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        embed.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--batch-size BATCH_SIZE sentences per forward pass (default: 32) " in text
    assert "--device {auto,cpu,cuda} auto: cuda where there is one (default: auto) " in text
    assert "--seed SEED seeds the random projection of --embed-dim (default: 0) " in text
    assert text.endswith("--json print the vectors as JSON instead of the similarities")


def test_an_empty_model_folder_gets_the_download_hint(tmp_path):
    result = run_embed("--model", tmp_path, "hello")
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path}: has neither tokenizer.json nor vocab.txt (nor vocab.json + "
                             "merges.txt); the folder is empty; `python download.py` fetches bert-base-uncased, "
                             "`--only NAME` another backbone\n")
