"""The unpadded path (model.Packing) against the padded one: the same outputs and gradients on real tokens.

Every comparison is in fp32, to 1e-5, with dropout off: the two paths draw
their dropout masks over tensors of different shapes, so with dropout on they
are two equally good random runs, not one.
"""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, TINY_PLAIN
from safetensors.torch import load_file

import model as model_module
import train
from data import IGNORE_INDEX
from model import POOLS, MultiTaskModel, Packing, SentenceEncoder
from support import cpu_attention
from support.model_folder import load_pretrained

FAMILIES = {"bert": TINY_PLAIN, "roberta": FIXTURES / "tiny_roberta_plain",
            "distilbert": FIXTURES / "tiny_distilbert_plain"}


def padded_batch(config, lengths=(9, 4, 12, 2, 7), seed=0):
    """Random ids right-padded with the family's pad id, token types with a segment B, NER tags and classes."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    ids = torch.randint(5, config.vocab_size, (len(lengths), width), generator=g)
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    types = torch.zeros_like(ids)
    if config.type_vocab_size > 1:
        types[0, 5:9] = 1
    tags = torch.randint(0, 9, ids.shape, generator=g).masked_fill(mask == 0, IGNORE_INDEX)
    classes = torch.randint(0, 4, (len(lengths),), generator=g)
    return ids, mask, types, tags, classes


def run(model, unpad, batch):
    """Outputs and gradients of both tasks on one path; eval mode, so no dropout."""
    ids, mask, types, tags, classes = batch
    model.bert.unpad = unpad
    model.zero_grad(set_to_none=True)
    hidden, pooled = model.bert(ids, mask, types)
    ag = model(ids, mask, "ag")
    ner = model(ids, mask, "ner")
    loss = F.cross_entropy(ag, classes) + F.cross_entropy(ner.flatten(0, 1), tags.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    real = mask.bool()
    return {"hidden": hidden[real], "pooled": pooled, "ag": ag, "ner": ner[real], "loss": loss}, grads


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unpadded_outputs_and_gradients_equal_the_padded_ones(family, pool):
    torch.manual_seed(0)
    bert = load_pretrained(FAMILIES[family])
    model = MultiTaskModel(SentenceEncoder(bert, pool, embed_dim=16, normalize="l2")).eval()
    batch = padded_batch(bert.config)
    padded, padded_grads = run(model, "never", batch)
    unpadded, unpadded_grads = run(model, "always", batch)
    for name, value in padded.items():
        assert (unpadded[name] - value).abs().max() <= 1e-5, name
    assert padded_grads.keys() == unpadded_grads.keys()
    unread_pooler = 2 * (pool != "cls" and bert.pooler is not None)  # its weight and bias
    assert len(padded_grads) == len(list(model.parameters())) - unread_pooler
    for name, grad in padded_grads.items():
        assert (unpadded_grads[name] - grad).abs().max() <= 1e-5, name
        assert grad.abs().max() > 0 or name.startswith("encoder.bert.embeddings.token_type"), name


def test_unpadded_path_skips_the_padding_and_fills_it_with_zeros():
    bert = load_pretrained(TINY_PLAIN).eval()
    ids, mask, types, *_ = padded_batch(bert.config)
    seen = []
    hook = bert.layers[0].ffn_in.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        hidden, _ = bert(ids, mask, types)  # auto: unpadded on the CPU
    hook.remove()
    assert seen == [torch.Size([int(mask.sum()), bert.config.hidden_size])]  # (N, H): the 34 real tokens only
    assert torch.equal(hidden[mask == 0], torch.zeros(int((mask == 0).sum()), bert.config.hidden_size))


def test_packing_packs_row_after_row_and_unpacks_back():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    x = torch.arange(12.0).view(3, 4)
    packing = Packing(mask)
    assert packing.pack(x).tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    assert packing.offsets.tolist() == [0, 3, 5, 9] and packing.lengths == [3, 2, 4]
    assert packing.unpack(packing.pack(x)).tolist() == [[0, 1, 2, 0], [4, 5, 0, 0], [8, 9, 10, 11]]


def test_in_bf16_on_the_cpu_the_packed_rows_and_attention_groups_are_rounded():
    """Fewer shapes for oneDNN's kernels: N real tokens -> a multiple of ROWS rows, groups a multiple of POSITIONS."""
    mask = (torch.arange(12)[None, :] < torch.tensor([9, 4, 12, 2, 7, 9])[:, None]).long()  # 43 real tokens
    x = torch.arange(72.0).view(6, 12) + 1
    assert len(Packing(mask).pack(x)) == 43  # fp32: no rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packing = Packing(mask)
    assert packing.rounding == (cpu_attention.ROWS, cpu_attention.POSITIONS) == (64, 8)
    packed = packing.pack(x)
    assert len(packed) == 64 and torch.equal(packed[43:], torch.ones(21))  # the extra rows copy position 0
    assert torch.equal(packing.unpack(packed), x * mask)
    assert packing.unpack(packed + 100)[0, 0] == 101  # unpack reads the real row 0, not its copies
    packed = packed[:, None]  # (N + R, C = 1)
    parts = packing.group(packed)
    assert [tuple(p.shape[:2]) for p, _ in parts] == [(6, 16)]  # one group, 12 rounded up to 16
    keep = parts[0][1].view(6, 16)
    assert keep.sum(1).tolist() == [2, 4, 7, 9, 9, 12]  # shortest first; positions 12 to 15 are padding
    back = packing.ungroup([p for p, _ in parts])
    assert torch.equal(back[:43], packed[:43]) and torch.equal(back[43:], packed[[0] * 21])  # row 0's attention


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rounded_packing_gives_the_padded_paths_outputs_and_gradients(monkeypatch, family):
    """The rounding rows and the groups' padding, forced in fp32, change no real output or gradient (to 1e-5)."""
    monkeypatch.setattr(model_module, "Packing", lambda mask: Packing(mask, rounds=True))
    monkeypatch.setattr(cpu_attention, "CALL", 30)  # several groups
    torch.manual_seed(0)
    bert = load_pretrained(FAMILIES[family])
    model = MultiTaskModel(SentenceEncoder(bert, "mean")).eval()
    batch = padded_batch(bert.config, (9, 4, 12, 2, 7, 9, 21))
    padded, padded_grads = run(model, "never", batch)
    unpadded, unpadded_grads = run(model, "always", batch)
    for name, value in padded.items():
        assert (unpadded[name] - value).abs().max() <= 1e-5, name
    assert padded_grads.keys() == unpadded_grads.keys()
    for name, grad in padded_grads.items():
        assert (unpadded_grads[name] - grad).abs().max() <= 1e-5, name


def test_auto_unpads_cpu_batches_with_a_fifth_of_padding_or_more(monkeypatch):
    bert = load_pretrained(TINY_PLAIN).eval()
    made = []
    monkeypatch.setattr(model_module, "Packing", lambda mask: made.append(mask.shape) or Packing(mask))
    ids, mask, *_ = padded_batch(bert.config)  # 34 real tokens of 60 positions: 43% padding
    little = torch.ones_like(mask)
    little[0, -11:] = 0  # 11 of 60: 18% padding, below PACK_FROM
    with torch.no_grad():
        bert(ids, torch.ones_like(mask))  # no padding: nothing to leave out
        bert(ids, little)
        assert made == []
        bert(ids, mask)
        assert made == [mask.shape]
        bert.unpad = "always"
        bert(ids, little)
        assert made == [mask.shape] * 2
        bert.unpad = "never"
        bert(ids, mask)
    assert made == [mask.shape] * 2
    assert model_module.PACK_FROM == 0.2
    bert.unpad = "auto"
    assert not bert.packs(mask.to("meta"))  # another device than the CPU pads, until measured there


@pytest.mark.parametrize("call, groups", [(0, [[3], [1], [4], [0, 5], [2]]), (30, [[3, 1], [4], [0, 5], [2]]),
                                          (100, [[3, 1], [4, 0, 5], [2]]), (10_000, [[3, 1, 4, 0, 5, 2]])])
def test_cpu_attention_in_groups_gives_the_padded_paths_outputs_and_gradients(monkeypatch, call, groups):
    """From a group per length (call 0) to one group for all: the same numbers, dropout off, to 1e-5."""
    lengths = (9, 4, 12, 2, 7, 9)
    assert cpu_attention.cheapest_groups(list(lengths), call) == groups
    monkeypatch.setattr(cpu_attention, "CALL", call)
    torch.manual_seed(0)
    bert = load_pretrained(TINY_PLAIN)
    model = MultiTaskModel(SentenceEncoder(bert, "mean")).eval()
    batch = padded_batch(bert.config, lengths)
    padded, padded_grads = run(model, "never", batch)
    unpadded, unpadded_grads = run(model, "always", batch)
    for name, value in padded.items():
        assert (unpadded[name] - value).abs().max() <= 1e-5, name
    for name, grad in padded_grads.items():
        assert (unpadded_grads[name] - grad).abs().max() <= 1e-5, name


def test_the_cpu_attention_groups_are_the_cheapest_cut():
    """Against every cut of the sorted sequences into runs, on random lengths: none costs less."""
    g = torch.Generator().manual_seed(0)
    for case in range(200):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        call, multiple = [0, 50, 400, 3000][case % 4], [1, 8][case // 4 % 2]  # multiple: bf16's rounding
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        padded = lambda m: -(-max(lengths[b] for b in m) // multiple) * multiple  # noqa: E731
        cost = lambda groups: sum(call + len(m) * padded(m) ** 2 for m in groups)  # noqa: E731
        groups = cpu_attention.cheapest_groups(lengths, call, multiple)
        assert sorted(b for m in groups for b in m) == list(range(len(lengths)))  # each sequence once
        for cuts in itertools.product([False, True], repeat=len(lengths) - 1):  # a cut after position i or not
            runs, begin = [], 0
            for i, cut in enumerate(cuts, 1):
                if cut:
                    runs.append(order[begin:i])
                    begin = i
            runs.append(order[begin:])
            assert cost(groups) <= cost(runs), (lengths, call, groups, runs)


def test_nested_tensor_attention_for_the_gpu_equals_per_sequence_attention():
    """Packing.attend (SDPA on nested jagged tensors, the GPU's kernel) run here on the CPU's math backend."""
    bert = load_pretrained(TINY_PLAIN).eval()
    attention = bert.layers[1].attn
    ids, mask, *_ = padded_batch(bert.config)
    packing = Packing(mask)
    x = torch.randn(int(mask.sum()), bert.config.hidden_size, generator=torch.Generator().manual_seed(2))
    x_nested, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
    nested = attention.out(packing.attend(attention.qkv(x_nested), attention.n_head, 0.0))
    split = attention(x_split, mask.bool()[:, None, None, :], packing)  # the CPU's way: per sequence
    padded = packing.pack(attention(packing.unpack(x), mask.bool()[:, None, None, :]))
    assert (nested - split).abs().max() <= 1e-5 and (split - padded).abs().max() <= 1e-5
    (nested * x).sum().backward()
    (split * x).sum().backward()
    assert (x_nested.grad - x_split.grad).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_unpadded_path_matches_the_padded_one(dtype):
    bert = load_pretrained(TINY_PLAIN).cuda().eval()
    ids, mask, types, *_ = (t.cuda() for t in padded_batch(bert.config))
    outputs = {}
    for unpad in ("never", "always"):
        bert.unpad = unpad
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            outputs[unpad] = bert(ids, mask, types)[0][mask.bool()].float()
    assert (outputs["never"] - outputs["always"]).abs().max() <= (1e-5 if dtype == torch.float32 else 3e-2)


def test_golden_reference_on_real_tokens_unpadded():
    reference = load_file(FIXTURES / "tiny_bert_reference.safetensors")
    bert = load_pretrained(TINY_PLAIN).eval()
    bert.unpad = "always"
    with torch.no_grad():
        hidden, pooled = bert(reference["input_ids"], reference["attention_mask"], reference["token_type_ids"])
    real = reference["attention_mask"].bool()
    assert (hidden[real] - reference["last_hidden_state"][real]).abs().max() <= 1e-5
    assert (pooled - reference["pooler_output"]).abs().max() <= 1e-5


@pytest.mark.parametrize("store", ["feature store", "no feature store"])
def test_a_frozen_backbone_run_is_the_same_unpadded(tmp_path, store):
    """Heads trained on a frozen backbone's outputs, stored once or computed at every step: the encoder runs in
    eval mode, the heads' dropout sees the same (B, T, H) tensors on both paths, so whole runs agree."""
    runs = {}
    for unpad in ("never", "always"):
        out = tmp_path / unpad
        argv = ["--model", str(TINY_PLAIN), "--data", str(FIXTURES / "data"), "--out", str(out), "--epochs", "2",
                "--freeze", "backbone", "--no-data-cache", "--unpad", unpad, "--batch-size", "4",
                "--max-len", "64"]
        assert train.main(argv + (["--no-feature-store"] if store == "no feature store" else [])) == 0
        runs[unpad] = (load_file(out / "model.safetensors"), json.loads((out / "summary.json").read_text()),
                       [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    (padded, padded_summary, padded_rows), (unpadded, unpadded_summary, unpadded_rows) = runs.values()
    assert padded.keys() == unpadded.keys()
    for name, tensor in padded.items():
        assert (unpadded[name] - tensor).abs().max() <= 1e-5, name
    for before, after in zip(padded_rows, unpadded_rows):
        assert abs(before["train_loss"] - after["train_loss"]) <= 1e-5
        assert (before["ag_accuracy"], before["ner_f1"]) == (after["ag_accuracy"], after["ner_f1"])
    assert padded_summary["ner_f1"] == unpadded_summary["ner_f1"]
    assert (padded_summary["feature_store"] is None) == (store == "no feature store")
