"""load_tokenizer against the reference BERT tokenizer on the bert-base-uncased vocabulary."""

import hashlib
import json

import pytest
from conftest import FIXTURES

from data import DataError, load_tokenizer

CASES = json.loads((FIXTURES / "tokenizer_cases.json").read_text())
VOCAB_DIR = FIXTURES / "bert_vocab"


def test_fixture_is_the_bert_base_uncased_vocab():
    digest = hashlib.sha256((VOCAB_DIR / "vocab.txt").read_bytes()).hexdigest()
    assert digest == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    assert len(CASES) >= 50


def check_cases(tokenizer):
    got = [e.ids for e in tokenizer.encode_batch([c["text"] for c in CASES])]
    wrong = [(c["text"], ids, c["ids"]) for c, ids in zip(CASES, got) if ids != c["ids"]]
    assert not wrong, wrong[:3]


def test_vocab_txt_matches_reference_ids():
    check_cases(load_tokenizer(VOCAB_DIR))


def test_tokenizer_json_matches_reference_ids(minilm_dir):
    check_cases(load_tokenizer(minilm_dir))


def test_live_against_transformers():
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizerFast.from_pretrained(str(VOCAB_DIR), do_lower_case=True)
    assert len(reference.get_vocab()) == 30522
    ours = load_tokenizer(VOCAB_DIR)
    for case in CASES:
        assert ours.encode(case["text"]).ids == reference(case["text"])["input_ids"], case["text"]


def test_known_pieces():
    tokenizer = load_tokenizer(VOCAB_DIR)
    encoding = tokenizer.encode("Héllo, unaffable [MASK]!")
    assert encoding.tokens == ["[CLS]", "hello", ",", "una", "##ffa", "##ble", "[MASK]", "!", "[SEP]"]
    assert encoding.ids[0] == 101 and encoding.ids[-1] == 102 and encoding.ids[6] == 103


def test_file_padding_and_truncation_are_switched_off(minilm_dir):
    """all-MiniLM-L6-v2's tokenizer.json pads to 128 and truncates at 128; load_tokenizer undoes both."""
    file = json.loads((minilm_dir / "tokenizer.json").read_text())
    assert file["padding"] is not None and file["truncation"]["max_length"] == 128
    tokenizer = load_tokenizer(minilm_dir)
    assert tokenizer.encode("hi").ids == [101, 7632, 102]
    assert len(tokenizer.encode("word " * 300).ids) == 302


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: has neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json: not a valid tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(DataError, match=r"vocab.txt: lacks the special tokens \[CLS\], \[SEP\], \[MASK\]"):
        load_tokenizer(tmp_path)
