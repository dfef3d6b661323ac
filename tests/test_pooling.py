"""Sentence embeddings: pooling, projection and normalization (Task 1)."""

import json

import pytest
import torch
from conftest import FIXTURES, TINY_PLAIN, assert_close
from safetensors import safe_open

from data import load_tokenizer
from embed import default_max_len
from model import SentenceEncoder, normalize_rows, pool_tokens
from support.model_folder import load_pretrained


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained(TINY_PLAIN).eval()


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer(TINY_PLAIN)


def batch():
    """Three rows of 6, 3 and 0 real tokens; the last row is all padding."""
    torch.manual_seed(0)
    input_ids = torch.randint(5, 99, (3, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [0] * 6])
    return input_ids.masked_fill(mask == 0, 0), mask


def test_mean_and_max_by_hand():
    hidden = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[-5.0, 6.0], [50.0, 50.0], [70.0, 70.0]]])  # (B=2, T=3, H=2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
    assert pool_tokens(hidden, pooled, mask, "mean").tolist() == [[2.0, 1.0], [-5.0, 6.0]]
    assert pool_tokens(hidden, pooled, mask, "max").tolist() == [[3.0, 4.0], [-5.0, 6.0]]
    assert pool_tokens(hidden, pooled, mask, "cls").tolist() == [[0.5, 0.5], [-0.5, -0.5]]


def test_max_ignores_padding_even_when_padding_is_largest(tiny):
    input_ids, mask = batch()
    hidden, pooled = tiny(input_ids, mask)
    poisoned = hidden.masked_fill(mask[:, :, None] == 0, 1e4)  # padding would win any unmasked max
    assert_close(pool_tokens(poisoned, pooled, mask, "max"), pool_tokens(hidden, pooled, mask, "max"), atol=0,
                 what="max pooling with the padding set to 1e4 (padding must never win)")
    assert pool_tokens(poisoned, pooled, mask, "max").max() < 1e3


@pytest.mark.parametrize("pool", ["mean", "max", "cls"])
def test_appending_padding_changes_nothing(tiny, pool):
    input_ids, mask = batch()
    input_ids, mask = input_ids[:2], mask[:2]
    encoder = SentenceEncoder(tiny, pool).eval()
    longer_ids = torch.cat([input_ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short, long = encoder(input_ids, mask), encoder(longer_ids, longer_mask)
    # Not bit-equal: a longer row changes how the attention kernel sums in fp32.
    assert_close(long, short, what=f"{pool} pooling of the same rows with 5 more padding positions")


def test_cls_is_the_pooler_output(tiny):
    input_ids, mask = batch()
    with torch.no_grad():
        hidden, pooled = tiny(input_ids, mask)
        out = SentenceEncoder(tiny, "cls")(input_ids, mask)
        by_hand = torch.tanh(hidden[:, 0] @ tiny.pooler.weight.T + tiny.pooler.bias)
    assert torch.equal(out, pooled)
    assert_close(out, by_hand, atol=1e-6, what="cls pooling: tanh(pooler(first token's state))")


def test_projection_then_normalization(tiny):
    input_ids, mask = batch()
    torch.manual_seed(3)
    encoder = SentenceEncoder(tiny, "mean", embed_dim=8, normalize="l2").eval()
    with torch.no_grad():
        out = encoder(input_ids, mask)
        hidden, _ = tiny(input_ids, mask)
        mean = torch.zeros(3, 32)
        for row in range(2):
            n = int(mask[row].sum())
            mean[row] = hidden[row, :n].mean(0)
        projected = encoder.project(mean)
    expected = projected[:2] / projected[:2].norm(dim=1, keepdim=True)
    assert out.shape == (3, 8) and encoder.embed_dim == 8
    assert_close(out[:2], expected, atol=1e-6, what="mean pooling, then the projection, then L2")
    # The all-padding row pools to zeros; the projection adds its bias, then L2 scales it.
    bias = encoder.project.bias
    assert_close(out[2], bias / bias.norm(), atol=1e-6, what="an all-padding row: zeros, projected, then L2")


def test_normalize_values():
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0], [1.0, 1.0]])
    assert_close(normalize_rows(x, "l2"), torch.tensor([[0.6, -0.8], [0.0, 0.0], [2 ** -0.5, 2 ** -0.5]]),
                 what="normalize_rows(x, 'l2')")
    assert_close(normalize_rows(x, "l1"), torch.tensor([[3 / 7, -4 / 7], [0.0, 0.0], [0.5, 0.5]]),
                 what="normalize_rows(x, 'l1')")
    assert torch.equal(normalize_rows(x, "none"), x)


def test_rejects_unknown_modes(tiny):
    with pytest.raises(ValueError, match="pool must be one of"):
        SentenceEncoder(tiny, "median")
    with pytest.raises(ValueError, match="normalize must be one of"):
        SentenceEncoder(tiny, "mean", normalize="l3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("pool", ["mean", "cls", "max"])
@pytest.mark.parametrize("norm", ["none", "l1", "l2"])
def test_every_mode_is_finite_in_every_dtype(dtype, pool, norm):
    bert = load_pretrained(TINY_PLAIN).eval().to(dtype)
    input_ids, mask = batch()
    with torch.no_grad():
        out = SentenceEncoder(bert, pool, normalize=norm).to(dtype)(input_ids, mask)
        reference = SentenceEncoder(load_pretrained(TINY_PLAIN).eval(), pool, normalize=norm)(input_ids, mask)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    if pool != "cls":  # an all-padding row has no tokens to pool
        assert out[2].abs().max() == 0
    # Low precision stays close to fp32 on the rows with real tokens.
    tolerance = {torch.float32: 1e-6, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert (out[:2].float() - reference[:2]).abs().max() <= tolerance
    if norm != "none":
        p = 1 if norm == "l1" else 2
        assert torch.allclose(out[:2].float().norm(p=p, dim=1), torch.ones(2), atol=1e-2)


def minilm_reference():
    path = FIXTURES / "minilm_reference.safetensors"
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["sentences"]), f.get_tensor("embeddings")


def test_mean_l2_matches_sentence_transformers_golden(minilm_dir):
    sentences, expected = minilm_reference()
    bert = load_pretrained(minilm_dir)
    max_len = default_max_len(minilm_dir, bert.config)
    assert max_len == 256  # the model's max_seq_length; the last sentence is longer
    assert len(load_tokenizer(minilm_dir).encode(sentences[-1]).ids) > 256
    ours = SentenceEncoder(bert, "mean", normalize="l2").encode(sentences, load_tokenizer(minilm_dir), 4, max_len)
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=1)
    assert cosine.min() >= 0.99999
    assert (ours - expected).abs().max() <= 1e-5


def test_mean_l2_matches_sentence_transformers_live(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    sentences = ["A completely new sentence for the live check.", "Short one.",
                 "Naïve façades and 3.5% growth in the 1990s!", "[MASK] tokens and 🙂 emoji",
                 "A long one, repeated past the limit of 256 pieces. " * 30]
    expected = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences, convert_to_tensor=True)
    bert = load_pretrained(minilm_dir)
    encoder = SentenceEncoder(bert, "mean", normalize="l2")
    ours = encoder.encode(sentences, load_tokenizer(minilm_dir), max_len=default_max_len(minilm_dir, bert.config))
    assert torch.nn.functional.cosine_similarity(ours, expected.cpu(), dim=1).min() >= 0.99999


def test_encode_batch_size_does_not_change_results(tiny, tiny_tokenizer):
    texts = ["the cat sat on the mat", "a dog", "stocks fell and rose", "the team won the game in the end"]
    encoder = SentenceEncoder(tiny, "max", normalize="l2").train()
    one_batch = encoder.encode(texts, tiny_tokenizer, batch_size=64)
    assert encoder.training and encoder.bert.training  # encode() puts the training mode back
    one_by_one = encoder.encode(texts, tiny_tokenizer, batch_size=1)
    assert (one_batch - one_by_one).abs().max() <= 1e-6
    assert encoder.encode([], tiny_tokenizer).shape == (0, 32)


def test_encode_truncates_keeping_sep(tiny, tiny_tokenizer):
    encoder = SentenceEncoder(tiny, "mean").eval()
    text = "the cat sat on the mat and the dog sat on the rug"
    pieces = tiny_tokenizer.encode(text).ids
    assert len(pieces) > 8
    cut = torch.tensor([pieces[:7] + pieces[-1:]])
    with torch.no_grad():
        expected = encoder(cut, torch.ones_like(cut))
    assert (encoder.encode([text], tiny_tokenizer, max_len=8) - expected).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="max_len must be between 2 and 64"):
        encoder.encode([text], tiny_tokenizer, max_len=65)
