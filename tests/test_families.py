"""RoBERTa and DistilBERT through the one encoder: golden fixtures from transformers, both file layouts.

The fixtures (scripts/make_family_fixtures.py) hold tiny random models in the
base-model layout and in the masked-LM layout the hub serves, and the
reference hidden states of transformers' RobertaModel / DistilBertModel for
a padded batch of mixed lengths.
"""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, ROOT
from safetensors.torch import load_file

import bench
import embed
import predict
import train
from conftest import encode_ner
from data import load_tokenizer
from model import MultiTaskModel, SentenceEncoder
from support.runtime import CheckpointError
from support.model_folder import checkpoint_names, load_multitask, load_pretrained, read_config, save_trained

CASES = json.loads((FIXTURES / "family_tokenizer_cases.json").read_text())
FOLDERS = {(family, layout): FIXTURES / f"tiny_{family}_{layout}"
           for family in ("roberta", "distilbert") for layout in ("plain", "hub")}


@pytest.mark.parametrize("family, layout", sorted(FOLDERS))
def test_hidden_states_match_transformers(family, layout):
    reference = load_file(FIXTURES / f"tiny_{family}_reference.safetensors")
    model = load_pretrained(FOLDERS[family, layout]).eval()
    with torch.no_grad():
        hidden, pooled = model(reference["input_ids"], reference["attention_mask"])
    real = reference["attention_mask"].bool()
    assert (hidden[real] - reference["last_hidden_state"][real]).abs().max() <= 1e-5
    if family == "roberta" and layout == "plain":  # the base-model file has a pooler
        assert model.config.has_pooler and (pooled - reference["pooler_output"]).abs().max() <= 1e-5
    else:  # the hub file (and DistilBERT) has none: "pooled" is the first token's state, no random pooler
        assert not model.config.has_pooler and model.pooler is None and torch.equal(pooled, hidden[:, 0])


def test_family_config_facts():
    roberta = read_config(FOLDERS["roberta", "hub"] / "config.json")
    assert (roberta.model_type, roberta.pad_token_id, roberta.position_start, roberta.max_len) == ("roberta", 1, 2, 64)
    assert roberta.type_vocab_size == 1 and roberta.layer_norm_eps == 1e-5
    distil = read_config(FOLDERS["distilbert", "hub"] / "config.json")
    assert (distil.hidden_size, distil.num_hidden_layers, distil.num_attention_heads, distil.intermediate_size) == (
        32, 2, 4, 37)
    assert (distil.type_vocab_size, distil.layer_norm_eps, distil.position_start, distil.max_len) == (0, 1e-12, 0, 64)
    assert checkpoint_names("layers.1.attn.qkv.weight", "distilbert") == [
        f"transformer.layer.1.attention.{x}_lin.weight" for x in "qkv"]
    assert checkpoint_names("layers.0.attn_norm.bias", "distilbert") == ["transformer.layer.0.sa_layer_norm.bias"]


def test_roberta_positions_skip_the_padding_id():
    """RoBERTa's position ids start at pad_token_id + 1 on real tokens; padding keeps pad_token_id."""
    model = load_pretrained(FOLDERS["roberta", "plain"]).eval()
    ids = torch.tensor([[0, 7, 8, 2, 1, 1]])
    seen = []
    hook = model.embeddings.position.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        for unpad in ("never", "always"):  # the unpadded path looks up the real tokens' positions only
            model.unpad = unpad
            model(ids, (ids != 1).long())
    hook.remove()
    assert seen[0].tolist() == [[2, 3, 4, 5, 1, 1]]
    assert seen[1].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("case, message", [
    ({"model_type": "xlnet"}, "model_type 'xlnet' is not supported; this encoder reads bert, roberta, distilbert"),
    ({"sinusoidal_pos_embds": True}, "distilbert with positions other than learned absolute ones is not supported"),
    ({"activation": "relu"}, "activation 'relu' is not supported (only 'gelu')"),
])
def test_unsupported_models_are_refused_in_one_line(tmp_path, case, message):
    folder = tmp_path / "model"
    shutil.copytree(FOLDERS["distilbert", "hub"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **case}))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pretrained(folder)
    assert embed.main(["--model", str(folder), "a sentence"]) == 2
    assert bench.main(["--model", str(folder)]) == 2
    assert train.main(["--model", str(folder), "--data", str(FIXTURES / "data"), "--out", str(tmp_path / "run"),
                       "--no-data-cache"]) == 2


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_a_trained_model_saves_in_its_family_layout_and_loads_back(tmp_path, family):
    torch.manual_seed(0)
    model = MultiTaskModel(SentenceEncoder(load_pretrained(FOLDERS[family, "hub"]), pool="mean"))
    save_trained(model, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_type"] == family and ("dim" in config) == (family == "distilbert")
    again = load_multitask(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert again.bert.config == model.bert.config


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_train_embed_and_predict_run_on_a_hub_layout_folder(tmp_path, family, capsys):
    folder = FOLDERS[family, "hub"]
    out = tmp_path / "run"
    argv = ["--model", str(folder), "--data", str(FIXTURES / "data"), "--out", str(out), "--max-len", "32",
            "--batch-size", "4", "--no-data-cache", "--epochs", "1", "--pool", "cls"]
    assert train.main(argv) == 0
    log = capsys.readouterr().out
    assert f"--pool cls: this {family} checkpoint has no pooler weights" in log and log.count("--pool cls:") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["ag_accuracy"] <= 1 and summary["config"]["pool"] == "cls"
    assert embed.main(["--model", str(folder), "--pool", "cls", "--json", "a cat", "the dog sat"]) == 0
    vectors = json.loads(capsys.readouterr().out)["embeddings"]
    assert len(vectors) == 2 and len(vectors[0]) == 32 and vectors[0] != vectors[1]
    assert predict.main(["--model", str(out), "--json", "the cat sat on the mat ."]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"text", "topic", "topic_scores", "entities"}
    assert bench.main(["--model", str(folder), "--batch-size", "2", "--seq-len", "8", "--steps", "1",
                       "--warmup", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{folder} (0.0 M parameters), cpu")


@pytest.mark.parametrize("family, layout", sorted(FOLDERS))
def test_live_against_transformers(family, layout):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModel.from_pretrained(FOLDERS[family, layout], attn_implementation="eager").eval()
    ours = load_pretrained(FOLDERS[family, layout]).eval()
    torch.manual_seed(3)
    pad = ours.config.pad_token_id
    input_ids = torch.randint(5, ours.config.vocab_size, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 5:], attention_mask[1, 5:] = pad, 0
    input_ids[2, 2:], attention_mask[2, 2:] = pad, 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden, _ = ours(input_ids, attention_mask)
    real = attention_mask.bool()
    assert (hidden[real] - expected[real]).abs().max() <= 1e-5


def test_no_code_names_the_bert_pad_token():
    """The pad id comes from the model's config: [PAD] is BERT's name only (model_folder.py's vocab.txt builder)."""
    for path in [*ROOT.glob("*.py"), *ROOT.glob("support/*.py")]:
        if path.name != "model_folder.py":
            assert '"[PAD]"' not in path.read_text(), path.name


def tokenizer_from(tmp_path, names):
    """load_tokenizer on a folder holding only the named files of the tiny RoBERTa."""
    folder = tmp_path / "-".join(names)
    folder.mkdir()
    for name in names:
        shutil.copyfile(FOLDERS["roberta", "plain"] / name, folder / name)
    return load_tokenizer(folder)


@pytest.mark.parametrize("names", [("vocab.json", "merges.txt"), ("tokenizer.json",)])
def test_roberta_ids_equal_transformers(tmp_path, names):
    tokenizer = tokenizer_from(tmp_path, names)
    assert len(CASES["roberta"]) >= 50
    for case in CASES["roberta"]:
        assert tokenizer.encode(case["text"]).ids == case["ids"], case["text"]


def test_distilbert_ids_equal_transformers():
    tokenizer = load_tokenizer(FIXTURES / "bert_vocab")  # distilbert-base-uncased ships bert-base-uncased's vocab.txt
    assert len(CASES["distilbert"]) >= 50
    for case in CASES["distilbert"]:
        assert tokenizer.encode(case["text"]).ids == case["ids"], case["text"]


@pytest.mark.parametrize("names", [("vocab.json", "merges.txt"), ("tokenizer.json",)])
def test_roberta_split_words_get_the_pieces_of_running_text(tmp_path, names):
    """NER's pre-split words: each word after the first in its leading-space form, so the ids are those of
    the words joined by spaces, and each word's first piece is the first whose offset, in transformers'
    encoding of that text, starts at or after the word."""
    tokenizer = tokenizer_from(tmp_path, names)
    for case in CASES["roberta_words"]:
        words = case["words"]
        data = encode_ner([(words, ["O"] * len(words))], tokenizer, 512)
        assert data.input_ids[0] == case["ids"], words
        assert data.first_piece[0] == first_pieces(words, case["offsets"]), words


def first_pieces(words, offsets):
    """Per word of " ".join(words), the index of its first piece, from (start, end) character offsets:
    the first piece after <s> that starts at or after the word (a lone "Ġ" piece starts, empty, at it)."""
    starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
    return [next(i for i, (a, _) in enumerate(offsets) if i > 0 and a >= start) for start in starts]


def test_live_tokenizers_against_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(FOLDERS["roberta", "plain"] / name, tmp_path / name)
    reference = transformers.RobertaTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(FOLDERS["roberta", "plain"])
    for case in CASES["roberta"]:
        assert ours.encode(case["text"]).ids == reference(case["text"])["input_ids"], case["text"]
    words = ["Zoë", "'s", "café", "opened", "in", "São", "Paulo", "."]
    expected = reference(" ".join(words), return_offsets_mapping=True)
    data = encode_ner([(words, ["O"] * len(words))], ours, 64)
    assert data.input_ids[0] == expected["input_ids"]
    assert data.first_piece[0] == first_pieces(words, expected["offset_mapping"])


def test_family_details_that_transformers_has(tmp_path):
    import freeze
    from data import byte_level
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    distil, bert = load_pretrained(FOLDERS["distilbert", "hub"]), load_pretrained(FIXTURES / "tiny_bert_plain")
    # DistilBERT's attention output goes to its LayerNorm without dropout; BERT's and RoBERTa's get dropout
    assert [layer.attn_dropout.p for layer in distil.layers] == [0.0, 0.0]
    assert bert.layers[0].attn_dropout.p == bert.layers[0].dropout.p == 0.1
    # Without a pooler, freezing every layer freezes the whole backbone: features can be stored
    assert freeze.Plan.from_flags("lower:2", "none", 2, ("ag_head", "ner_head"), pooler=False).backbone_fixed()
    assert not freeze.Plan.from_flags("lower:2", "none", 2, ("ag_head", "ner_head"), pooler=True).backbone_fixed()
    # transformers' defaults where config.json is silent: RoBERTa pads with 1
    raw = json.loads((FOLDERS["roberta", "hub"] / "config.json").read_text())
    del raw["pad_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = read_config(tmp_path / "config.json")
    assert (config.pad_token_id, config.position_start) == (1, 2)
    assert not byte_level(Tokenizer(WordPiece({"[UNK]": 0}, unk_token="[UNK]")))  # no pre-tokenizer at all


def test_a_run_folder_keeps_a_vocab_json_and_merges_tokenizer(tmp_path):
    folder = tmp_path / "roberta"
    shutil.copytree(FOLDERS["roberta", "hub"], folder)
    (folder / "tokenizer.json").unlink()
    argv = ["--model", str(folder), "--data", str(FIXTURES / "data"), "--out", str(tmp_path / "run"),
            "--max-len", "32", "--batch-size", "4", "--no-data-cache", "--epochs", "1"]
    assert train.main(argv) == 0
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"vocab.json", "merges.txt"}
    text = "The cat sat on the mat."
    assert load_tokenizer(tmp_path / "run").encode(text).ids == load_tokenizer(folder).encode(text).ids
    assert predict.main(["--model", str(tmp_path / "run"), text]) == 0
