"""Sentence pairs (STS-B, Cer et al., 2017): reading and batching them, and the two models that score them.

pairs.py trains these; embed.py embeds sentences with a trained bi-encoder.
Reading order: read_stsb -> PairData / encode_pairs (tokenized for either
model) -> collate_pairs -> load_stsb (every split of DATA/stsb) -> PairModel
(bi- and cross-encoder) -> load_pairs, a trained one from its folder.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from support import data_cache
from data import _encode, pad
from model import Dropout, SentenceEncoder
from support.model_folder import load_trained
from support.runtime import DataError, read_text


# --- The data ------------------------------------------------------------------------

STSB_COLUMNS = "genre, file, year, id, score, sentence 1, sentence 2"


def read_stsb(path):
    """STS benchmark lines (Cer et al., 2017) -> [(sentence 1, sentence 2, score 0-5)].

    Tab-separated: genre, file, year, id, score, sentence 1, sentence 2, and on
    some lines two source columns more. There is no quoting: a lone " is part
    of a sentence, so the lines are split on tabs, never read as CSV.
    """
    pairs = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) < 7:
            raise DataError(f"{path}:{number}: expected 7 tab-separated columns ({STSB_COLUMNS}), "
                            f"found {len(columns)}")
        try:
            score = float(columns[4])
        except ValueError:
            raise DataError(f"{path}:{number}: the score {columns[4]!r} is not a number") from None
        if not 0 <= score <= 5:
            raise DataError(f"{path}:{number}: the score {columns[4]} is outside 0-5")
        pairs.append((columns[5], columns[6], score))
    if not pairs:
        raise DataError(f"{path}: no sentence pairs")
    return pairs


@dataclass
class PairData:
    """Sentence pairs, tokenized for a bi-encoder or a cross-encoder, with gold scores in 0-5.

    cross: pair i is input_ids[i] in the tokenizer's pair template, with segment ids token_type_ids[i].
    bi:    pair i is two sentences tokenized alone, input_ids[i] (a) and b_ids[i] (b).
    """
    input_ids: list  # cross: [CLS] a [SEP] b [SEP] (BERT), <s> a </s></s> b </s> (RoBERTa); bi: [CLS] a [SEP]
    token_type_ids: list  # cross: 0 for a and the tokens around it, 1 for b and its [SEP] (all 0 for RoBERTa)
    scores: list
    truncated: list  # True if the pair (or either sentence) was cut to max_len
    b_ids: list = None  # bi: [CLS] b [SEP]
    source: str = None  # a fingerprint of the file and tokenization it came from (load_stsb)

    def __len__(self):
        return len(self.scores)

    def lengths(self):
        """Word pieces per pair: what a batch of it costs."""
        return np.array([len(ids) + (len(self.b_ids[i]) if self.b_ids else 0) for i, ids in enumerate(self.input_ids)])

    def subset(self, indices):
        def pick(rows):
            return None if rows is None else [rows[i] for i in indices]
        return PairData(pick(self.input_ids), pick(self.token_type_ids), pick(self.scores), pick(self.truncated),
                        pick(self.b_ids), self.source)


def encode_pairs(pairs, tokenizer, max_len, kind="cross"):
    """[(a, b, score)] -> PairData.

    cross: too long a pair loses pieces from its longer sentence first, one at
    a time (the tokenizers library's longest_first, transformers' default for
    pairs). bi: each sentence is cut to max_len on its own.
    """
    scores = [s for _, _, s in pairs]
    if kind == "cross":
        encodings = _encode(tokenizer, [(a, b) for a, b, _ in pairs], max_len)
        return PairData([e.ids for e in encodings], [e.type_ids for e in encodings], scores,
                        [bool(e.overflowing) for e in encodings])
    a, b = (_encode(tokenizer, [pair[side] for pair in pairs], max_len) for side in (0, 1))
    return PairData([e.ids for e in a], [e.type_ids for e in a], scores,
                    [bool(x.overflowing or y.overflowing) for x, y in zip(a, b)], [e.ids for e in b])


def collate_pairs(data, indices, pad_id=0, multiple=1):
    """The chosen pairs as a batch for model.PairModel: input_ids, attention_mask and
    token_type_ids (cross), or a_ids, a_mask, b_ids, b_mask (bi); and scores (B,), in 0-5."""
    scores = torch.tensor([data.scores[i] for i in indices], dtype=torch.float32)
    if data.b_ids is None:
        input_ids, attention_mask = pad([data.input_ids[i] for i in indices], pad_id, multiple)
        token_type_ids, _ = pad([data.token_type_ids[i] for i in indices], 0, multiple)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                "scores": scores}
    a_ids, a_mask = pad([data.input_ids[i] for i in indices], pad_id, multiple)
    b_ids, b_mask = pad([data.b_ids[i] for i in indices], pad_id, multiple)
    return {"a_ids": a_ids, "a_mask": a_mask, "b_ids": b_ids, "b_mask": b_mask, "scores": scores}


STSB_FILES = {"train": "sts-train.csv", "valid": "sts-dev.csv", "test": "sts-test.csv"}


def load_stsb(data_dir, tokenizer, max_len, kind):
    """{split: PairData} from DATA/stsb/ for a bi- or cross-encoder (kind); "test" only where its
    file is there. A missing train or dev file is a DataError with the download command."""
    out = {}
    for split, name in STSB_FILES.items():
        path = Path(data_dir) / "stsb" / name
        if not path.exists():
            if split == "test":
                continue
            raise DataError(f"{path}: not found; run `python download.py --only stsb` (or give --data)")
        out[split] = encode_pairs(read_stsb(path), tokenizer, max_len, kind)
        out[split].source = data_cache.key(path, tokenizer, max_len)
    return out


# --- The models ----------------------------------------------------------------------

PAIR_KINDS = ("bi", "cross")


class ScoreHead(nn.Module):
    """Dropout -> one logit, on the pooler's output: BERT's own sequence-classification head (Devlin
    et al., 2019). The pooler is pre-trained (dense + tanh), so one new linear layer is all that starts
    from random, where a Task 2 Head adds a random dense + LayerNorm + GELU (docs/pairs.md compares them)."""

    def __init__(self, in_dim, dropout=0.1):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.out = nn.Linear(in_dim, 1)

    def forward(self, x):
        return self.out(self.dropout(x))  # (B, H) -> (B, 1)


class PairModel(nn.Module):
    """How alike two sentences are, scored two ways (Reimers & Gurevych, 2019, Sentence-BERT).

    bi:    each sentence goes through the SentenceEncoder on its own, and the
           score is the cosine of the two embeddings. A sentence is embedded
           once and compared with any number of others (search at scale).
    cross: both sentences go through the encoder together, in the tokenizer's
           pair template ([CLS] a [SEP] b [SEP], segment ids 0 then 1), so every
           word of one attends to every word of the other; a head on the first
           token's pooled state gives one logit, whose sigmoid is the score.
           Each pair needs a pass of its own.

    The cross-encoder's head is called cls_head, as BERT's sequence-classification
    head is: --freeze cls-head and the saved files name it so, and
    model.parameter_part counts a bi-encoder's projection as that part too.
    """
    SECTION, WRITTEN_BY = "pairs", "pairs.py"  # its settings' and head's name in a model folder

    def __init__(self, bert, kind, pool="mean", embed_dim=None, normalize="none", head_dropout=0.1):
        super().__init__()
        if kind not in PAIR_KINDS:
            raise ValueError(f"kind must be one of {PAIR_KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "bi":
            self.encoder = SentenceEncoder(bert, pool, embed_dim, normalize)
        else:  # the pooler (dense + tanh on the first token, or that token's state without one), then a logit
            self.encoder = SentenceEncoder(bert, "cls")
            self.cls_head = ScoreHead(bert.config.hidden_size, head_dropout)

    @classmethod
    def from_settings(cls, bert, settings):
        """The model that settings() describes (config.json keeps them), on this bert."""
        return cls(bert, **settings)

    @property
    def bert(self):
        return self.encoder.bert

    def forward(self, batch):
        """bi: cosine similarities (B,) of batch's a_ids/a_mask and b_ids/b_mask rows;
        cross: logits (B,) of its input_ids, attention_mask and token_type_ids rows."""
        if self.kind == "bi":
            a = self.encoder(batch["a_ids"], batch["a_mask"])  # (B, D)
            b = self.encoder(batch["b_ids"], batch["b_mask"])  # (B, D)
            return cosine(a, b)
        hidden, pooled = self.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return self.cls_head(pooled).squeeze(-1)  # (B, H) -> (B, 1) -> (B,)

    def settings(self):
        """What, beyond the BERT config, rebuilds this model (stored in config.json)."""
        if self.kind == "cross":
            return {"kind": "cross", "head_dropout": self.cls_head.dropout.p}
        embed_dim = None if self.encoder.project is None else self.encoder.embed_dim
        return {"kind": "bi", "pool": self.encoder.pool, "embed_dim": embed_dim, "normalize": self.encoder.norm}


def cosine(a, b):
    """Row-wise cosine similarity of (B, D) tensors, in fp32: a.b / (|a| |b|), and 0 for a zero row."""
    a, b = a.float(), b.float()
    norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=torch.finfo(torch.float32).tiny)
    return (a * b).sum(-1) / norms


def load_pairs(model_dir, device="cpu"):
    """A PairModel from a folder written by pairs.py."""
    return load_trained(model_dir, PairModel, device)
