"""data.py: reading both datasets, token alignment, padding, the multi-task sampler, bad input."""

import subprocess
from dataclasses import replace
import sys

import numpy as np
import pytest
import torch
from conftest import FIXTURES, ROOT

import data
from conftest import encode_classification, encode_ner, read_ag_news, read_conll
from data import IGNORE_INDEX, DataError, MultiTaskSampler, collate, encode_file, load_splits, load_tokenizer, split_off, word_tags
from support.readers import clean_ag_text, to_iob2
from support.tasks import NER_TAGS, TASKS
from support.data_summary import padding_fraction

DATA = FIXTURES / "data"
SHARED = ROOT.parent / "shared" / "data"  # real files, present on the development machines and in CI
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="the real data in ../shared/data is absent")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURES / "bert_vocab")


# --- AG News -------------------------------------------------------------------------

@pytest.mark.parametrize("before, after", [
    # a backslash stood for a line break
    ("Reuters - Short-sellers, Wall Street's dwindling\\band of ultra-cynics",
     "Reuters - Short-sellers, Wall Street's dwindling band of ultra-cynics"),
    ("Envoys flew to Khartoum on\\Wednesday", "Envoys flew to Khartoum on Wednesday"),
    # ... except before a dollar sign, where it escaped it
    ("EquiServe, for \\$292 million", "EquiServe, for $292 million"),
    # HTML entities that lost their "&", with the space left in its place
    ("what many in Canada #39;s North have been saying", "what many in Canada's North have been saying"),
    ("seized in a  quot;pre-planned quot; attack", 'seized in a "pre-planned" attack'),
    ("Microsoft  amp; Novell", "Microsoft & Novell"),
    ("AT amp;T Wireless", "AT&T Wireless"),
    ("for  #36;5 billion", "for $5 billion"),
    # runs of spaces
    ("profit fell on Wednesday  as profit    warnings mounted ", "profit fell on Wednesday as profit warnings mounted"),
    # an entity that kept its "&" is left alone, and so is a word that ends like one
    ("the training camp; officials said", "the training camp; officials said"),
    ("&lt;b&gt;...&lt;/b&gt; Fish &amp; chips", "&lt;b&gt;...&lt;/b&gt; Fish &amp; chips"),
])
def test_ag_cleaning_rules(before, after):
    assert clean_ag_text(before) == after


def test_read_ag_news_fixture():
    rows = read_ag_news(DATA / "ag_news" / "train.csv")
    assert len(rows) == 40
    assert sorted({label for _, label in rows}) == [0, 1, 2, 3]
    assert rows[3] == (("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's "
                        "dwindling band of ultra-cynics, are seeing green again."), 2)
    assert rows[11] == (('Japans "Baseball" strike Players walk out, the first strike in the league\'s history, '
                         "AT&T sponsors said."), 1)
    assert rows[19][0] == 'Sudan talks Envoys flew to Khartoum on Wednesday for talks, she said: "we hope" for peace.'


@needs_shared
def test_real_ag_news_counts():
    rows = read_ag_news(SHARED / "ag_news" / "train.csv")
    assert len(rows) == 5600
    assert np.bincount([label for _, label in rows]).tolist() == [1400, 1400, 1400, 1400]
    texts = " ".join(text for text, _ in rows)
    assert " #39;" not in texts and "\\" not in texts and "  " not in texts


# --- CoNLL-2003 --------------------------------------------------------------------

def test_read_conll_fixture():
    sentences = read_conll(DATA / "conll2003" / "train.txt")
    assert len(sentences) == 24
    words, tags = sentences[0]
    assert words == ["Microsoft", "rejects", "British", "call", "to", "boycott", "lamb", "from", "Germany", "."]
    assert tags == ["B-ORG", "O", "B-MISC", "O", "O", "O", "O", "O", "B-LOC", "O"]
    assert all("-DOCSTART-" not in w for w, _ in sentences)


@needs_shared
def test_real_conll_counts():
    for split, n_sentences, n_tokens in (("train", 14041, 203621), ("valid", 3250, 51362)):
        sentences = read_conll(SHARED / "conll2003" / f"{split}.txt")
        assert len(sentences) == n_sentences
        assert sum(len(words) for words, _ in sentences) == n_tokens
        assert {tag for _, tags in sentences for tag in tags} == set(NER_TAGS)


def test_iob1_file_becomes_iob2(tmp_path):
    # IOB1: entities open with I-; B- only separates two adjacent entities of one type.
    lines = ["-DOCSTART- -X- -X- O", "", "Peter NNP I-NP I-PER", "Blackburn NNP I-NP I-PER", "met VBD I-VP O",
             "John NNP I-NP I-PER", "Paul NNP I-NP B-PER", "in IN I-PP O", "New NNP I-NP I-LOC",
             "York NNP I-NP I-LOC", "Yankees NNPS I-NP I-ORG", ". . O O", ""]
    (tmp_path / "iob1.txt").write_text("\n".join(lines))
    [(_, tags)] = read_conll(tmp_path / "iob1.txt")
    assert tags == ["B-PER", "I-PER", "O", "B-PER", "B-PER", "O", "B-LOC", "I-LOC", "B-ORG", "O"]
    assert to_iob2(tags) == tags  # IOB2 input is left as it is


# --- Bad input: one line naming the file and line, exit status 2 ---------------------

BAD_FILES = [
    ("ag_news/train.csv", '"3","Title","Body"\n"2","Only a title"\n', "ag_news/train.csv:2: expected 3 columns"),
    ("ag_news/train.csv", '"3","Title","Body"\n"7","Title","Body"\n', "ag_news/train.csv:2: label must be one of 1, 2, 3, 4, found '7'"),
    ("ag_news/train.csv", '"three","Title","Body"\n', "ag_news/train.csv:1: label must be one of 1, 2, 3, 4, found 'three'"),
    ("ag_news/train.csv", "", "ag_news/train.csv: empty file"),
    ("conll2003/train.txt", "EU NNP B-NP B-ORG\nrejects\n", "conll2003/train.txt:2: expected 2 columns, found 1"),
    ("conll2003/train.txt", "EU NNP B-NP B-ORG\n\nBonn NNP B-NP B-CITY\n",
     "conll2003/train.txt:3: unknown ner tag 'B-CITY'"),
    ("ag_news/train.csv", b'"3","Title","Body"\n"1","Caf\xe9","Body"\n', "ag_news/train.csv:2: not UTF-8 text (byte 0xe9)"),
    ("conll2003/valid.txt", "-DOCSTART- -X- -X- O\n\n\n", "conll2003/valid.txt: no sentences"),
    ("conll2003/train.txt", b"EU NNP B-NP B-ORG\n\n\x89PNG\x00\x00\x01", "conll2003/train.txt:3: binary data"),
]


def write_data_dir(tmp_path, name, content):
    """A copy of the fixture data directory with one file replaced (or removed, for content None)."""
    root = tmp_path / "data"
    for source in DATA.rglob("*.*"):
        target = root / source.relative_to(DATA)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    path = root / name
    if content is None:
        path.unlink()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return root, path


@pytest.mark.parametrize("name, content, message", BAD_FILES)
def test_bad_file_raises_with_file_and_line(tmp_path, name, content, message):
    _, path = write_data_dir(tmp_path, name, content)
    read = read_ag_news if name.endswith(".csv") else read_conll
    with pytest.raises(DataError) as info:
        read(path)
    assert str(info.value).startswith(str(path.parent.parent / message))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, content, message",
                         [BAD_FILES[0], BAD_FILES[5], BAD_FILES[7], BAD_FILES[8],
                          ("conll2003/test.txt", None, "conll2003/test.txt: not found; run `python download.py` first")])
def test_bad_file_on_the_command_line(tmp_path, name, content, message):
    root, _ = write_data_dir(tmp_path, name, content)
    result = subprocess.run([sys.executable, str(ROOT / "data.py"), "--data", str(root), "--model",
                             str(FIXTURES / "bert_vocab"), "--no-data-cache"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {root / message}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- Token ids and labels -------------------------------------------------------------

def test_classification_is_cls_text_sep_and_truncates(tokenizer):
    rows = [("Hello world", 1), ("one two three four five six seven", 3)]
    encoded = encode_classification(rows, tokenizer, max_len=6)
    assert encoded.input_ids[0] == [101, 7592, 2088, 102]
    assert encoded.input_ids[1] == [101, 2028, 2048, 2093, 2176, 102]  # one two three four, then [SEP]
    assert encoded.labels == [1, 3] and encoded.truncated == [False, True]
    assert tokenizer.truncation is None  # the shared tokenizer is left as it was


def test_ner_label_on_first_piece_only(tokenizer):
    words = ["Blackburn", "visited", "Llanfairpwll", "."]
    tags = ["B-PER", "O", "B-LOC", "O"]
    encoded = encode_ner([(words, tags)], tokenizer, max_len=64)
    pieces = [tokenizer.id_to_token(i) for i in encoded.input_ids[0]]
    assert pieces == ["[CLS]", "blackburn", "visited", "ll", "##an", "##fa", "##ir", "##pw", "##ll", ".", "[SEP]"]
    per, loc, o = NER_TAGS.index("B-PER"), NER_TAGS.index("B-LOC"), NER_TAGS.index("O")
    x = IGNORE_INDEX
    assert encoded.labels[0] == [x, per, o, loc, x, x, x, x, x, o, x]
    assert encoded.first_piece[0] == [1, 2, 3, 9]
    assert word_tags(encoded.labels[0], encoded.first_piece[0], NER_TAGS) == tags


def test_truncated_sentence_maps_cut_words_to_o(tokenizer):
    words = ["Peter", "Blackburn", "met", "John", "Smith"]
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER"]
    encoded = encode_ner([(words, tags)], tokenizer, max_len=5)  # [CLS] peter blackburn met [SEP]
    assert encoded.truncated == [True] and encoded.first_piece[0] == [1, 2, 3, -1, -1]
    predicted = [0, NER_TAGS.index("B-PER"), NER_TAGS.index("I-PER"), 0, 0]
    assert word_tags(predicted, encoded.first_piece[0], NER_TAGS) == ["B-PER", "I-PER", "O", "O", "O"]


def alignment_mismatches(sentences, tokenizer, max_len):
    encoded = encode_ner(sentences, tokenizer, max_len)
    wrong = [i for i in range(len(encoded))
             if word_tags(encoded.labels[i], encoded.first_piece[i], NER_TAGS) != encoded.word_tags[i]]
    return wrong, [i for i, cut in enumerate(encoded.truncated) if cut]


def test_alignment_round_trips_on_fixture(tokenizer):
    sentences = read_conll(DATA / "conll2003" / "valid.txt")
    assert alignment_mismatches(sentences, tokenizer, 128) == ([], [])
    wrong, truncated = alignment_mismatches(sentences, tokenizer, 8)
    assert truncated and set(wrong) <= set(truncated)


@needs_shared
def test_alignment_round_trips_on_real_valid(tokenizer):
    sentences = read_conll(SHARED / "conll2003" / "valid.txt")
    wrong, truncated = alignment_mismatches(sentences, tokenizer, 128)
    print(f"real valid at max_len 128: {len(truncated)} sentences truncated, {len(wrong)} of them lose tags")
    assert set(wrong) <= set(truncated)
    assert len(truncated) == 3  # with this vocabulary and max_len 128


def test_cache_gives_the_same_data_and_follows_the_file(tmp_path, tokenizer, monkeypatch):
    root, path = write_data_dir(tmp_path, "conll2003/valid.txt", (DATA / "conll2003" / "valid.txt").read_text())
    cache = tmp_path / "cache"
    first = encode_file(path, TASKS["ner"], tokenizer, 128, cache)
    assert len(list(cache.iterdir())) == 1
    with monkeypatch.context() as patch:  # a second read must come from the cache, not the tokenizer
        patch.setattr(data, "encode", lambda *a: pytest.fail("tokenized again instead of reading the cache"))
        again = encode_file(path, TASKS["ner"], tokenizer, 128, cache)
    assert again == first == encode_file(path, TASKS["ner"], tokenizer, 128)
    ag = encode_file(root / "ag_news" / "train.csv", TASKS["ag"], tokenizer, 128, cache)
    assert encode_file(root / "ag_news" / "train.csv", TASKS["ag"], tokenizer, 128, cache) == ag
    path.write_text(path.read_text().replace("B-LOC", "B-ORG"))  # new content, new key
    changed = encode_file(path, TASKS["ner"], tokenizer, 128, cache)
    assert changed != first and len(list(cache.iterdir())) == 3
    encode_file(path, TASKS["ner"], tokenizer, 64, cache)  # another max_len, another key
    assert len(list(cache.iterdir())) == 4


def cached_split_pair(tokenizer, cache):
    """The cache entries of two NER splits of the fixture data, (valid, test) as (path, entry, data)."""
    splits = []
    for split in ("valid", "test"):
        path = DATA / "conll2003" / f"{split}.txt"
        part = encode_file(path, TASKS["ner"], tokenizer, 128, cache)
        [entry] = cache.glob(f"conll2003-{split}-{part.source}.safetensors")  # named by the split and its key
        splits.append((path, entry, part))
    return splits


def reads_from_cache(monkeypatch, path, tokenizer, cache):
    """encode_file(path) with tokenizing forbidden: what the cache holds for it."""
    with monkeypatch.context() as patch:
        patch.setattr(data, "encode", lambda *a: pytest.fail("tokenized again instead of reading the cache"))
        return encode_file(path, TASKS["ner"], tokenizer, 128, cache)


def test_a_cache_entry_copied_over_another_split_is_not_read_as_it(tmp_path, tokenizer, monkeypatch, capsys):
    cache = tmp_path / "cache"
    (_, valid_entry, valid), (test_path, test_entry, test) = cached_split_pair(tokenizer, cache)
    assert valid != test
    test_entry.write_bytes(valid_entry.read_bytes())  # the valid split's tokens under the test split's name
    capsys.readouterr()
    again = encode_file(test_path, TASKS["ner"], tokenizer, 128, cache)
    assert again == test and again.word_tags == test.word_tags and len(again) == len(test)
    assert capsys.readouterr().err == (f"note: {test_entry}: holds the tokens of another file, tokenizer or "
                                       "--max-len; tokenizing again\n")
    assert reads_from_cache(monkeypatch, test_path, tokenizer, cache) == test  # the entry was rewritten
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage, problem", [
    ("flip", "is damaged (its arrays do not match their checksum)"),
    ("truncate", "is unreadable ("),
    ("old_format", "has no stored key (an older cache format)"),
])
def test_a_damaged_or_old_cache_entry_is_tokenized_again(tmp_path, tokenizer, monkeypatch, capsys, damage, problem):
    cache = tmp_path / "cache"
    _, (test_path, entry, test) = cached_split_pair(tokenizer, cache)
    raw = entry.read_bytes()
    if damage == "flip":  # one bit of the last token id: the header still parses
        entry.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "truncate":
        entry.write_bytes(raw[:len(raw) // 2])
    else:  # as the cache was written before it stored its key: the same arrays, metadata without key or sha256
        from safetensors.numpy import load_file, save_file
        save_file(load_file(entry), entry, metadata={"task": "ner"})
    capsys.readouterr()
    assert encode_file(test_path, TASKS["ner"], tokenizer, 128, cache) == test
    err = capsys.readouterr().err
    assert err.startswith(f"note: {entry}: {problem}") and err.endswith("; tokenizing again\n") and err.count("\n") == 1
    assert reads_from_cache(monkeypatch, test_path, tokenizer, cache) == test


# --- Batches --------------------------------------------------------------------------

@pytest.mark.parametrize("multiple", [1, 8])
def test_collate_pads_only_where_the_mask_is_zero(tokenizer, multiple):
    rng = np.random.default_rng(0)
    sentences = read_conll(DATA / "conll2003" / "train.txt")
    ner = encode_ner(sentences, tokenizer, 128)
    ag = encode_classification(read_ag_news(DATA / "ag_news" / "train.csv"), tokenizer, 128)
    for part in (ner, ag):
        for _ in range(20):
            indices = rng.choice(len(part), size=int(rng.integers(1, 9)), replace=False).tolist()
            batch = collate(part, indices, pad_id=0, multiple=multiple)
            assert batch["task"] == part.task.name
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            longest = max(len(part.input_ids[i]) for i in indices)
            assert ids.shape[1] % multiple == 0 and longest <= ids.shape[1] < longest + multiple
            for row, i in enumerate(indices):
                n = len(part.input_ids[i])
                assert ids[row, :n].tolist() == part.input_ids[i] and mask[row, :n].eq(1).all()
                assert ids[row, n:].eq(0).all() and mask[row, n:].eq(0).all()
                if part.task.name == "ner":
                    assert labels[row, :n].tolist() == part.labels[i] and labels[row, n:].eq(IGNORE_INDEX).all()
            if part.task.name == "ag":
                assert labels.tolist() == [part.labels[i] for i in indices]


def sampler_lengths(n_ag=103, n_ner=40, seed=0):
    rng = np.random.default_rng(seed)
    return {"ag": rng.integers(5, 60, n_ag), "ner": rng.integers(3, 30, n_ner)}


def test_sampler_equal_examples_single_task_batches():
    lengths = sampler_lengths()
    sampler = MultiTaskSampler(lengths, batch_size=8, seed=1)
    batches = sampler.epoch(0)
    seen = {"ag": [], "ner": []}
    for task, indices in batches:
        assert 1 <= len(indices) <= 8
        assert all(0 <= i < len(lengths[task]) for i in indices)
        seen[task] += indices
    assert len(seen["ag"]) == len(seen["ner"]) == 40  # min(103, 40) each
    assert len(set(seen["ag"])) == 40 and sorted(seen["ner"]) == list(range(40))
    assert [task for task, _ in batches] != sorted(task for task, _ in batches)  # the tasks are interleaved


def test_sampler_is_seeded_and_the_larger_task_moves_on():
    lengths = sampler_lengths()
    a, b = MultiTaskSampler(lengths, 8, seed=1), MultiTaskSampler(lengths, 8, seed=1)
    assert a.epoch(0) == b.epoch(0) and a.epoch(3) == b.epoch(3)
    assert MultiTaskSampler(lengths, 8, seed=2).epoch(0) != a.epoch(0)
    ag_by_epoch = [[i for task, idx in a.epoch(e) for i in idx if task == "ag"] for e in range(4)]
    assert all(len(set(ag)) == 40 for ag in ag_by_epoch)  # no example twice in an epoch
    assert set(ag_by_epoch[0]).isdisjoint(ag_by_epoch[1])  # a different subset of AG each epoch
    assert set().union(*ag_by_epoch[:3]) == set(range(103))  # and all of it within ceil(103 / 40) epochs
    assert set(ag_by_epoch[3]) != set(ag_by_epoch[0])  # the next pass is shuffled anew


def test_sampler_ranks_get_disjoint_equal_shares_with_the_same_task_per_step():
    lengths = sampler_lengths()
    samplers = [MultiTaskSampler(lengths, 4, seed=5, ranks=(r, 3)) for r in range(3)]
    batches = samplers[0].epoch(2)
    assert all(s.epoch(2) == batches for s in samplers)  # every rank sees the same global batches
    # The same global batches as one process with 3 x the batch size.
    assert batches == MultiTaskSampler(lengths, 12, seed=5).epoch(2)
    for task, global_batch in batches:
        shares = [s.share(global_batch) for s in samplers]
        assert [i for share in shares for i in share] == global_batch  # disjoint, and nothing left out
        assert max(map(len, shares)) - min(map(len, shares)) <= 1 and min(map(len, shares)) >= 1
    for task in ("ag", "ner"):
        used = [i for t, idx in batches for i in idx if t == task]
        assert len(used) == len(set(used)) == 40  # 40 % 12 = 4 >= 3 ranks: the last batch is kept
    # 40 = 13 x 3 + 1: a last global batch of 1 example cannot feed 3 ranks, so it is dropped.
    assert sum(len(b) for t, b in MultiTaskSampler(lengths, 1, ranks=(0, 3)).epoch(0) if t == "ag") == 39


def test_length_grouping_cuts_padding():
    lengths = sampler_lengths(n_ag=2000, n_ner=2000)
    plain = MultiTaskSampler(lengths, 16, seed=0, group_window=0).epoch(0)
    grouped = MultiTaskSampler(lengths, 16, seed=0, group_window=20).epoch(0)
    assert padding_fraction(grouped, lengths) < padding_fraction(plain, lengths) / 4
    hand = {"ag": np.array([2, 4, 4]), "ner": np.array([1])}
    assert padding_fraction([("ag", [0, 1]), ("ag", [2]), ("ner", [0])], hand) == pytest.approx(1 - 11 / 13)


def test_ag_validation_split_is_seeded_and_disjoint():
    kept, held = split_off(1000, 0.05, seed=3)
    assert len(held) == 50 and len(kept) == 950 and set(kept).isdisjoint(held)
    assert np.array_equal(split_off(1000, 0.05, seed=3)[1], held)
    assert not np.array_equal(split_off(1000, 0.05, seed=4)[1], held)


def test_a_larger_ag_validation_share_holds_out_a_superset(tokenizer):
    """train.py --ag-valid-fraction: 0.25 of the fixture's 40 AG rows is 10, and holds the default's 2 rows."""
    small = load_splits(DATA, tokenizer, 128, splits=("train", "valid"))["ag"]
    large = load_splits(DATA, tokenizer, 128, splits=("train", "valid"), tasks=[replace(TASKS["ag"], valid_fraction=0.25)])["ag"]
    assert (len(large["train"]), len(large["valid"])) == (30, 10)
    assert set(small["valid"].rows) < set(large["valid"].rows)
    assert set(large["train"].rows) | set(large["valid"].rows) == set(small["train"].rows) | set(small["valid"].rows)


def test_load_splits_and_command_line_summary(tokenizer):
    splits = load_splits(DATA, tokenizer, 128)
    sizes = {task: {s: len(part) for s, part in by.items()} for task, by in splits.items()}
    assert sizes == {"ag": {"train": 38, "valid": 2, "test": 12}, "ner": {"train": 24, "valid": 8, "test": 8}}
    result = subprocess.run([sys.executable, str(ROOT / "data.py"), "--data", str(DATA), "--model",
                             str(FIXTURES / "bert_vocab"), "--no-data-cache"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["ag", "train", "38"]
    assert lines[4].split()[:5] == ["ner", "train", "24", "277", "words;"]
    assert "padding" in lines[-1] and "batches of 32" in lines[-1]


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", f"argument --seed: must be a whole number from 0 to {2**32 - 1}, got -1"),
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--max-len", "2", "argument --max-len: must be at least 3, got 2"),
    ("--splits", "train,dev", "argument --splits: expected names from train,valid,test, got 'train,dev'"),
])
def test_summary_flags_out_of_range_are_one_line(capsys, flag, value, message):
    from support import data_summary
    argv = ["--data", str(DATA), "--model", str(FIXTURES / "bert_vocab"), "--no-data-cache", flag, value]
    assert data_summary.main(argv, data) == 2
    assert capsys.readouterr() == ("", f"error: {message}\n")


def test_summary_flags_all_have_help(capsys):
    from support import data_summary
    with pytest.raises(SystemExit) as exit_:
        data_summary.main(["--help"], data)
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps at the terminal's width
    assert "--batch-size BATCH_SIZE examples per batch of the training epoch whose padding is measured (default: 32)" in text
    assert "--seed SEED seeds the sampler's order of that epoch (default: 0)" in text
    assert "--data DATA data directory written by download.py (default: data) --model" in text  # the default once
    assert "--no-data-cache tokenize again instead of using DATA/.cache" in text and "(default: False)" not in text


def test_collated_batch_feeds_the_encoder(tokenizer):
    """A collated batch is what Bert.forward takes: the same states as one unpadded example."""
    from support.model_folder import load_pretrained
    bert = load_pretrained(FIXTURES / "tiny_bert_plain").eval()
    tiny_tok = load_tokenizer(FIXTURES / "tiny_bert_plain")
    part = encode_classification([("the cat sat", 0), ("a dog sat on the mat", 1)], tiny_tok, 32)
    batch = collate(part, [0, 1])
    with torch.no_grad():
        hidden, _ = bert(batch["input_ids"], batch["attention_mask"])
        alone, _ = bert(torch.tensor([part.input_ids[0]]))
    n = len(part.input_ids[0])
    assert (hidden[0, :n] - alone[0]).abs().max() <= 1e-5


def test_ignore_index_is_what_cross_entropy_skips():
    logits = torch.randn(3, len(NER_TAGS))
    labels = torch.tensor([1, IGNORE_INDEX, 4])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.nn.functional.cross_entropy(logits, labels) == expected


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    rows = '"3","Wall St. rallies","Stocks rose."\n"1","Talks resume","Leaders met."\n'
    plain, marked = tmp_path / "plain.csv", tmp_path / "marked.csv"
    plain.write_text(rows)
    marked.write_bytes(b"\xef\xbb\xbf" + rows.encode())
    assert read_ag_news(marked) == read_ag_news(plain) == [("Wall St. rallies Stocks rose.", 2),
                                                            ("Talks resume Leaders met.", 0)]
