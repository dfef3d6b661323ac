"""The hand-written encoder against transformers.BertModel, and checkpoint loading."""

import json
import shutil

import pytest
import torch
from conftest import BROKEN, FIXTURES, TINY_LEGACY, TINY_PLAIN, broken_copy
from safetensors.torch import load_file, save_file

from data import load_tokenizer
from runtime import CheckpointError
from model_folder import checkpoint_names, load_pretrained, read_config, to_checkpoint

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
    with torch.no_grad():
        hidden, pooled = model(REFERENCE["input_ids"], REFERENCE["attention_mask"], REFERENCE["token_type_ids"])
    assert REFERENCE["attention_mask"].sum(1).tolist() == [11, 7, 3, 1]  # padded batch
    assert (hidden - REFERENCE["last_hidden_state"]).abs().max() <= 1e-5
    assert (pooled - REFERENCE["pooler_output"]).abs().max() <= 1e-5


def test_token_types_matter():
    """Segment embeddings are used: dropping row 0's segment B changes its states."""
    model = load_pretrained(TINY_PLAIN).eval()
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
    input_ids, mask = encode_padded(load_tokenizer(minilm_dir), SENTENCES)
    assert len(set(mask.sum(1).tolist())) >= 8  # varied lengths
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask)
        hidden, pooled = ours(input_ids, mask)
    # Padded positions included; real tokens agree to ~3e-6 here, padded ones
    # to ~4e-5 (transformers' own sdpa and eager paths differ there by 3e-5).
    assert (hidden - expected.last_hidden_state).abs().max() <= 1e-4
    assert (pooled - expected.pooler_output).abs().max() <= 1e-4


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
