"""The encoder's speed paths compute what the plain paths compute.

Fused QKV loading is checked in test_model.py; here: the CPU dropout, the
written-out attention used for CPU training, and skipping the mask when a
batch has no padding.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PLAIN

import model as model_module
from model import BertConfig, SelfAttention, dropout
from support.model_folder import load_pretrained


def test_cpu_dropout_zeroes_p_and_scales_the_rest():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    zero = y == 0
    # 400k draws: the standard deviation of the dropped fraction is 0.00047
    assert abs(zero.float().mean().item() - 0.1) < 0.002
    assert torch.equal(y[~zero], torch.full_like(y[~zero], 1 / 0.9))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, 2 * y.detach())  # the gradient goes through the same mask and scale


def test_cpu_dropout_is_off_in_eval_and_keeps_the_dtype():
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    y = dropout(x, 0.5, training=True)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * 2)


def small_attention(dropout_p):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, attention_probs_dropout_prob=dropout_p)
    return SelfAttention(config)


def random_qkv_and_keep():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 4, 7, 8, generator=g) for _ in range(3))  # (B, nh, T, hs)
    keep = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    keep[0, ..., 4:] = False
    keep[2, ..., 2:] = False
    return q, k, v, keep


def test_written_out_attention_equals_sdpa_without_dropout():
    attention = small_attention(0.0)
    q, k, v, keep = random_qkv_and_keep()
    ours = attention._attend_with_dropout(q, k, v, keep)
    assert (ours - F.scaled_dot_product_attention(q, k, v, attn_mask=keep)).abs().max() < 1e-6


def test_written_out_attention_drops_weights_after_the_softmax():
    attention = small_attention(0.25)
    q, k, v, keep = random_qkv_and_keep()
    torch.manual_seed(3)
    ours = attention._attend_with_dropout(q, k, v, keep)
    torch.manual_seed(3)  # the same draws, applied by hand
    mask = (torch.rand(3, 4, 7, 7) >= 0.25) / 0.75
    weights = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~keep, float("-inf")).softmax(-1)
    assert (ours - (weights * mask) @ v).abs().max() < 1e-6


def test_the_cpu_training_step_takes_the_written_out_attention(monkeypatch):
    attention = small_attention(0.1).train()
    calls = []
    monkeypatch.setattr(SelfAttention, "_attend_with_dropout",
                        lambda self, q, k, v, keep: calls.append(1) or q)
    attention(torch.randn(2, 5, 32), None)
    attention.eval()(torch.randn(2, 5, 32), None)
    assert calls == [1]  # training only; evaluation stays in SDPA


def test_a_batch_without_padding_runs_sdpa_without_a_mask(monkeypatch):
    bert = load_pretrained(TINY_PLAIN).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 101, (2, 9), generator=g)
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        unpadded, _ = bert(ids, torch.ones_like(ids))
        assert masks and all(m is None for m in masks)
        masks.clear()
        # The same two rows next to a padded one: now a mask is needed, and the two rows do not change.
        padded_ids = torch.cat([ids, ids[:1]])
        attention_mask = torch.ones_like(padded_ids)
        attention_mask[2, 4:] = 0
        padded, _ = bert(padded_ids, attention_mask)
    assert masks and all(m is not None for m in masks)
    assert (padded[:2] - unpadded).abs().max() < 1e-5  # a different kernel, the same result


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_model_dropout_modules_use_the_cpu_dropout(p):
    torch.manual_seed(0)
    layer = model_module.Dropout(p).train()
    y = layer(torch.ones(100_000))
    assert abs((y == 0).float().mean().item() - p) < 0.01


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_a_cuda_device_switches_off_cudnn_attention_and_a_cpu_leaves_it(monkeypatch, name):
    # cuDNN plans each new attention shape again; our batches come in many widths.
    from support.runtime import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert pick_device("cpu") == torch.device("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert pick_device(name) == torch.device("cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
