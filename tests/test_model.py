"""The hand-written encoder against transformers.BertModel, and checkpoint loading."""

import json
import math
import shutil

import pytest
import torch
from conftest import assert_close, BROKEN, FIXTURES, TINY_LEGACY, TINY_PLAIN, broken_copy
from safetensors.torch import load_file, save_file

from data import load_tokenizer
from model import MultiTaskModel, SentenceEncoder
from support.tasks import TASKS
from support.model_folder import (checkpoint_names, copy_tokenizer, load_multitask, load_pretrained, read_config,
                          save_trained, to_checkpoint)
from support.runtime import CheckpointError, DataError

REFERENCE = load_file(FIXTURES / "tiny_bert_reference.safetensors")

# Real-model inputs: different lengths, so the batch is padded.
SENTENCES = [
    "The cat sat on the mat.",
    "Stocks fell sharply on Tuesday after the central bank raised interest rates again.",
    "Hi",
    "EU rejects German call to boycott British lamb .",
    "Café naïve résumé: accents are stripped by the uncased tokenizer.",
    "1,000,000 people; 3.14159; $5.00 and 24/7",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "我爱北京 and 🙂 become [UNK] or single characters",
    "",
]


def encode_padded(tokenizer, texts):
    """(ids, mask) for texts, right-padded with id 0."""
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    width = max(map(len, ids))
    input_ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in ids])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in ids])
    return input_ids, mask


@pytest.mark.parametrize("folder", [TINY_PLAIN, TINY_LEGACY], ids=["plain", "legacy"])
def test_matches_golden_reference(folder):
    model = load_pretrained(folder).eval()
    model.unpad = "never"  # the padded path computes the padding too, so every position compares
    with torch.no_grad():
        hidden, pooled = model(REFERENCE["input_ids"], REFERENCE["attention_mask"], REFERENCE["token_type_ids"])
    assert REFERENCE["attention_mask"].sum(1).tolist() == [11, 7, 3, 1]  # padded batch
    assert_close(hidden, REFERENCE["last_hidden_state"], what="the hidden states (transformers.BertModel's)")
    assert_close(pooled, REFERENCE["pooler_output"], what="the pooler output (transformers.BertModel's)")


def test_attend_is_softmax_attention_over_the_real_keys_only():
    """SelfAttention.attend (eval): softmax(q k^T / sqrt(head size)) v, where a key that keep masks (padding)
    gets no weight at all. The expected values are computed here, one query and one key at a time."""
    attention = load_pretrained(TINY_PLAIN).layers[0].attn.eval()
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 positions, head size 2
    k = torch.tensor([[1.0, 2.0], [0.5, -1.0], [9.0, 9.0]])  # the third position is padding
    v = torch.tensor([[1.0, 10.0], [2.0, 20.0], [1000.0, 1000.0]])
    keep = torch.tensor([True, True, False])

    def by_hand(real):
        rows = []
        for qi in q.tolist():
            scores = [math.exp(sum(a * b for a, b in zip(qi, k[j].tolist())) / math.sqrt(2)) for j in real]
            rows.append([sum(s * v[j, d].item() for s, j in zip(scores, real)) / sum(scores) for d in range(2)])
        return torch.tensor(rows)

    with torch.no_grad():
        masked = attention.attend(q[None, None], k[None, None], v[None, None], keep.view(1, 1, 1, 3))[0, 0]
        unmasked = attention.attend(q[None, None], k[None, None], v[None, None], None)[0, 0]
    assert_close(masked, by_hand([0, 1]), what="attend(q, k, v, keep) with the third key masked")
    assert_close(unmasked, by_hand([0, 1, 2]), atol=1e-3, what="attend(q, k, v, None): every key counts")


def test_token_types_matter():
    """Segment embeddings are used: dropping row 0's segment B changes its states."""
    model = load_pretrained(TINY_PLAIN).eval()
    model.unpad = "never"
    with torch.no_grad():
        hidden, _ = model(REFERENCE["input_ids"], REFERENCE["attention_mask"])
    assert (hidden[0] - REFERENCE["last_hidden_state"][0]).abs().max() > 1e-2
    assert (hidden[1:] - REFERENCE["last_hidden_state"][1:]).abs().max() <= 1e-5


def test_both_layouts_load_identical_weights():
    plain, legacy = load_pretrained(TINY_PLAIN), load_pretrained(TINY_LEGACY)
    legacy_params = dict(legacy.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p, legacy_params[name]), name


def test_rename_table_covers_every_parameter():
    model = load_pretrained(TINY_PLAIN)
    file = load_file(TINY_PLAIN / "model.safetensors")
    assert {key for n, _ in model.named_parameters() for key in checkpoint_names(n)} == set(file)
    assert checkpoint_names("layers.0.ffn_norm.bias") == ["encoder.layer.0.output.LayerNorm.bias"]
    assert checkpoint_names("layers.1.attn.qkv.weight") == [f"encoder.layer.1.attention.self.{x}.weight"
                                                           for x in ("query", "key", "value")]


def test_fused_qkv_stacks_query_key_value_and_splits_back():
    model = load_pretrained(TINY_PLAIN)
    file = load_file(TINY_PLAIN / "model.safetensors")
    qkv = model.layers[1].attn.qkv
    for x, rows in zip(("query", "key", "value"), qkv.weight.detach().chunk(3)):
        assert torch.equal(rows, file[f"encoder.layer.1.attention.self.{x}.weight"])
    split = to_checkpoint("layers.1.attn.qkv.bias", qkv.bias.detach())
    assert list(split) == [f"encoder.layer.1.attention.self.{x}.bias" for x in ("query", "key", "value")]
    for key, tensor in split.items():
        assert torch.equal(tensor, file[key])


def test_live_tiny_against_transformers():
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(str(TINY_PLAIN)).eval()
    ours = load_pretrained(TINY_PLAIN).eval()
    ours.unpad = "never"  # padded positions compare too; tests/test_unpadded.py matches the unpadded path
    torch.manual_seed(1)
    input_ids = torch.randint(5, 101, (3, 17))
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask)
        hidden, pooled = ours(input_ids, mask)
    assert (hidden - expected.last_hidden_state).abs().max() <= 1e-5
    assert (pooled - expected.pooler_output).abs().max() <= 1e-5


def test_live_minilm_against_transformers(minilm_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    ours = load_pretrained(minilm_dir).eval()
    ours.unpad = "never"
    input_ids, mask = encode_padded(load_tokenizer(minilm_dir), SENTENCES)
    assert len(set(mask.sum(1).tolist())) >= 8  # varied lengths
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask)
        hidden, pooled = ours(input_ids, mask)
    # Padded positions included; real tokens agree to ~3e-6 here, padded ones
    # to ~4e-5 (transformers' own sdpa and eager paths differ there by 3e-5).
    assert (hidden - expected.last_hidden_state).abs().max() <= 1e-4
    assert (pooled - expected.pooler_output).abs().max() <= 1e-4
    ours.unpad = "always"  # the real tokens only: to 1e-5
    with torch.no_grad():
        hidden, pooled = ours(input_ids, mask)
    real = mask.bool()
    assert (hidden[real] - expected.last_hidden_state[real]).abs().max() <= 1e-5
    assert (pooled - expected.pooler_output).abs().max() <= 1e-5


def test_config_reads_json_and_rejects_other_activations(tmp_path):
    config = read_config(TINY_PLAIN / "config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert (config.intermediate_size, config.vocab_size, config.layer_norm_eps) == (37, 101, 1e-12)
    raw = json.loads((TINY_PLAIN / "config.json").read_text())
    raw["hidden_act"] = "gelu_new"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: hidden_act 'gelu_new' is not supported"):
        read_config(tmp_path / "config.json")


# --- Bad checkpoints: each gives one line that names the file and the problem ---

@pytest.mark.parametrize("case", BROKEN)
def test_bad_checkpoint_raises_one_line(tmp_path, case):
    folder, expected = broken_copy(tmp_path, case)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder)
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_legacy_extras_are_the_only_keys_ignored(tmp_path):
    """cls.* and position_ids are dropped; any other stray key in the legacy file is an error."""
    folder = tmp_path / "legacy"
    shutil.copytree(TINY_LEGACY, folder)
    tensors = load_file(folder / "model.safetensors")
    assert "bert.embeddings.position_ids" in tensors and "cls.predictions.bias" in tensors
    tensors["bert.encoder.layer.0.output.adapter.weight"] = torch.zeros(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys: encoder.layer.0.output.adapter.weight"):
        load_pretrained(folder)


def test_a_tensor_named_twice_or_not_float_is_an_error(tmp_path):
    folder = tmp_path / "twice"
    shutil.copytree(TINY_LEGACY, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["pooler.dense.weight"] = torch.zeros(32, 32)  # also there as bert.pooler.dense.weight
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="two tensors are named pooler.dense.weight"):
        load_pretrained(folder)
    folder = tmp_path / "ints"
    shutil.copytree(TINY_PLAIN, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["pooler.dense.bias"] = torch.zeros(32, dtype=torch.int64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="pooler.dense.bias holds torch.int64, not floating-point weights"):
        load_pretrained(folder)


def test_nan_weights_are_refused_naming_the_tensor(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(TINY_PLAIN, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: encoder.layer.1.output.dense.weight holds NaN "
                                              r"or infinite values"):
        load_pretrained(folder)


# --- A trained model's folder: weights that fit config.json, hints that fit a run ---

def trained_folder(tmp_path, embed_dim=None):
    """A model folder as train.py leaves it: the tiny encoder with its heads, and the tokenizer files."""
    folder = tmp_path / "run"
    torch.manual_seed(0)
    save_trained(MultiTaskModel(SentenceEncoder(load_pretrained(TINY_PLAIN), pool="mean", embed_dim=embed_dim)), folder)
    copy_tokenizer(TINY_PLAIN, folder)
    return folder


def fit_message(folder, problem):
    weights = "heads.safetensors" if problem.split(": ")[1].startswith(("multitask.", "pairs.")) else "model.safetensors"
    return (f"{folder / weights}: {problem}; the weights do not fit {folder / 'config.json'} "
            "(was it edited, or copied from another model?)")


@pytest.mark.parametrize("edit, problem", [
    ({"hidden_size": 16}, "shape mismatch: embeddings.LayerNorm.bias is (32,), config.json implies (16,) (and 36 more)"),
    ({"vocab_size": 100}, "shape mismatch: embeddings.word_embeddings.weight is (101, 32), config.json implies (100, 32)"),
    ({"intermediate_size": 30},
     "shape mismatch: encoder.layer.0.intermediate.dense.bias is (37,), config.json implies (30,) (and 5 more)"),
    ({"num_hidden_layers": 1}, "unexpected keys: encoder.layer.1.attention.output.LayerNorm.bias (and 15 more)"),
    ({"num_hidden_layers": 3}, "missing keys: encoder.layer.2.attention.output.LayerNorm.bias (and 15 more)"),
    ({"multitask": {"tasks": [{**TASKS["ag"].card(), "labels": list("abcde")}, TASKS["ner"].card()]}},
     "shape mismatch: multitask.heads.ag.out.bias is (4,), config.json implies (5,) (and 1 more)"),
    ({"multitask": {"tasks": [TASKS["ag"].card(), {**TASKS["ner"].card(), "labels": ["O", "B-X", "I-X"]}]}},
     "shape mismatch: multitask.heads.ner.out.bias is (9,), config.json implies (3,) (and 1 more)"),
    ({"multitask": {"embed_dim": 8}}, "missing keys: multitask.encoder.project.bias (and 1 more)"),
])
def test_weights_that_do_not_fit_an_edited_config_are_one_line(tmp_path, capsys, edit, problem):
    import predict
    folder = trained_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    expected = fit_message(folder, problem)
    loaders = [load_multitask] + ([] if "multitask" in edit else [load_pretrained])
    for load in loaders:
        with pytest.raises(CheckpointError) as info:
            load(folder)
        assert str(info.value) == expected
    capsys.readouterr()
    assert predict.main(["--model", str(folder), "a text"]) == 2
    assert capsys.readouterr() == ("", f"error: {expected}\n")


def test_a_trained_projection_must_fit_too(tmp_path):
    folder = trained_folder(tmp_path, embed_dim=8)
    config = json.loads((folder / "config.json").read_text())
    config["multitask"]["embed_dim"] = None
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_multitask(folder)
    assert str(info.value) == fit_message(folder, "unexpected keys: multitask.encoder.project.bias (and 1 more)")


def test_a_sentence_pair_model_must_fit_its_settings_too(tmp_path, capsys):
    from support.sentence_pairs import PairModel, load_pairs
    folder = tmp_path / "pairs"
    save_trained(PairModel(load_pretrained(TINY_PLAIN), "bi", embed_dim=8), folder)
    load_pretrained(folder)  # a bi-encoder's projection is no head: embed.py reads it next, without a note
    assert capsys.readouterr() == ("", "")
    config = json.loads((folder / "config.json").read_text())
    config["pairs"]["embed_dim"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_pairs(folder)
    assert str(info.value) == fit_message(
        folder, "shape mismatch: pairs.encoder.project.bias is (8,), config.json implies (4,) (and 1 more)")


@pytest.mark.parametrize("state, missing, hint", [
    ("stopped in its first epoch", "config.json",
     ("{run} is a training run that has not saved a model yet (no epoch has finished): continue it with "
      "--out {run} --resume")),
    ("killed in its first epoch", "config.json",
     ("{run} is a training run that has not saved a model yet (no epoch has finished), and has no "
      "checkpoint to continue from: start it again")),
    ("weights removed", "model.safetensors",
     "{run} is a training run whose model.safetensors was removed: restore the file, or train the run again"),
])
def test_a_run_folder_without_its_model_gets_a_hint_that_fits_a_run(tmp_path, capsys, state, missing, hint):
    import predict
    run = trained_folder(tmp_path)
    (run / ".lock").write_text("pid 1 on here\n")
    if state == "weights removed":
        (run / "summary.json").write_text("{}")
        (run / "model.safetensors").unlink()
    else:  # the model is saved at the end of the first epoch, its config.json and tokenizer files last
        for path in run.iterdir():
            if path.name != ".lock":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if state == "stopped in its first epoch":
        (run / "checkpoint").mkdir()
        (run / "checkpoint" / "checkpoint.safetensors").write_bytes(b"")
    expected = f"{run / missing}: not found; {hint.format(run=run)}"
    for load in (load_pretrained, load_multitask):
        with pytest.raises(CheckpointError) as info:
            load(run)
        assert str(info.value) == expected and "download.py" not in expected
    assert predict.main(["--model", str(run), "a text"]) == 2
    assert capsys.readouterr() == ("", f"error: {expected}\n")
    if state != "weights removed":  # train.py and embed.py read the tokenizer first: the same hint
        with pytest.raises(DataError) as info:
            load_tokenizer(run)
        assert str(info.value).endswith(f"; {hint.format(run=run)}")


def test_a_run_folder_without_its_tokenizer_gets_a_hint_that_fits_a_run(tmp_path):
    run = trained_folder(tmp_path)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "vocab.txt").unlink()
    with pytest.raises(DataError) as info:
        load_tokenizer(run)
    assert str(info.value) == (f"{run}: has neither tokenizer.json nor vocab.txt (nor vocab.json + merges.txt); {run} "
                               "is a training run whose tokenizer files were removed: copy them back from the model "
                               "folder it was trained from (its --model)")


def test_a_plain_folder_without_weights_still_gets_the_download_hint(tmp_path):
    folder, _ = broken_copy(tmp_path, "missing_weights")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder)
    assert str(info.value) == (f"{folder / 'model.safetensors'}: not found; `python download.py` fetches "
                               "bert-base-uncased, `--only NAME` another backbone")


@pytest.mark.parametrize("embed_dim, projection", [(None, ""), (8, " or its sentence projection")])
def test_loading_only_the_encoder_of_a_trained_model_says_so(tmp_path, capsys, embed_dim, projection):
    run = trained_folder(tmp_path, embed_dim)
    trained = load_multitask(run)
    capsys.readouterr()
    bert = load_pretrained(run, new_heads=True)  # as train.py and pairs.py do
    note = (f"note: {run} is a trained model; only its encoder is loaded, not its heads (ag_head, ner_head)"
            f"{projection}: a model built on it starts them again from random\n")
    assert capsys.readouterr() == ("", note)
    assert all(torch.equal(a, b) for a, b in zip(bert.state_dict().values(), trained.bert.state_dict().values()))
    load_pretrained(TINY_PLAIN, new_heads=True)
    load_pretrained(run)  # embed.py: only the encoder was asked for
    load_multitask(run)  # the whole model: nothing left behind
    assert capsys.readouterr() == ("", "")
