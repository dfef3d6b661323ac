"""The BERT encoder, written out in full, and what Tasks 1 and 2 put on top of it.

Follows Devlin et al. (2019) and matches the numerics of Hugging Face `transformers.BertModel`
(tests/test_model.py proves it to 1e-5 in fp32). RoBERTa (Liu et al., 2019) and DistilBERT
(Sanh et al., 2019) are the same post-LN encoder with other position numbers, no token types
or no pooler: FAMILIES holds those differences as data, and one class runs all three
(tests/test_families.py matches RobertaModel and DistilBertModel).

Reading order:
  the encoder   FAMILIES, BertConfig -> Embeddings -> SelfAttention -> Layer -> Packing
                (the unpadded path) -> Bert (encoder + pooler); Dropout is nn.Dropout's,
                drawn faster on the CPU (support/cpu_dropout.py)
  Task 1        pool_tokens / SentenceEncoder: one vector per sentence
  Task 2        Head / MultiTaskModel: one encoder, a head per task (support/tasks.py), and
                parameter_part, the names freezing and learning rates use

support/model_folder.py reads and writes the weights. attention_mask is (B, T): 1 = a real token,
0 = padding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from support import cpu_attention
from support.cpu_dropout import Dropout, dropout
from support.tasks import SEED_TASKS, TASKS, Task


# --- The encoder --------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """What one model_type changes in the computation (its files' names: model_folder.NAMES)."""
    positions_after_padding: bool = False  # position ids start at pad_token_id + 1 (RoBERTa)
    attention_output_dropout: bool = True  # DistilBERT: no dropout on the attention output


# DistilBERT's lack of token types and of a pooler is data too: type_vocab_size 0, has_pooler False.
FAMILIES = {"bert": Family(), "roberta": Family(positions_after_padding=True),
            "distilbert": Family(attention_output_dropout=False)}


@dataclass
class BertConfig:
    """The shape of a BERT model, as its config.json gives it (defaults: bert-base-uncased)."""
    vocab_size: int = 30522  # word pieces in vocab.txt
    hidden_size: int = 768  # H: width of every token state
    num_hidden_layers: int = 12  # L: transformer layers
    num_attention_heads: int = 12  # nh: H is split into nh heads of H / nh
    intermediate_size: int = 3072  # width inside each feed-forward block (4 H)
    max_position_embeddings: int = 512  # longest input, in word pieces
    type_vocab_size: int = 2  # segment A / segment B
    # BERT was pre-trained in TensorFlow with LayerNorm epsilon 1e-12, not
    # PyTorch's default 1e-5; the pretrained weights expect it.
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and block outputs
    attention_probs_dropout_prob: float = 0.1  # dropout on attention weights
    pad_token_id: int = 0  # id of the padding token: [PAD] (BERT), <pad> (RoBERTa)
    # Set by the model family and the checkpoint, not read from config.json's keys:
    model_type: str = "bert"  # bert | roberta | distilbert (FAMILIES)
    has_pooler: bool = True  # False for a checkpoint without one (the hub's RoBERTa and DistilBERT)

    @property
    def position_start(self):
        """Position id of the first real token: 0, or pad_token_id + 1 (RoBERTa)."""
        return self.pad_token_id + 1 if FAMILIES[self.model_type].positions_after_padding else 0

    @property
    def max_len(self):
        """The longest input in word pieces: the position table, less the ids RoBERTa skips."""
        return self.max_position_embeddings - self.position_start


class Embeddings(nn.Module):
    """Token id + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                           if config.type_vocab_size else None)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.position_start, self.pad_id = config.position_start, config.pad_token_id

    def forward(self, input_ids, token_type_ids, packing=None):
        if self.position_start:
            # RoBERTa numbers the real tokens pad_token_id + 1, + 2, ... and gives padding
            # pad_token_id, as transformers' create_position_ids_from_input_ids does.
            real = (input_ids != self.pad_id).long()  # (B, T)
            positions = torch.cumsum(real, dim=1) * real + (self.position_start - 1)  # (B, T)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        if packing is not None:  # the unpadded path: (B, T) -> (N,), the real tokens' ids only
            input_ids, positions, token_type_ids = (packing.pack(t.expand_as(input_ids))
                                                    for t in (input_ids, positions, token_type_ids))
        x = self.word(input_ids) + self.position(positions)  # (B, T, H), or (N, H)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: softmax(QK^T / sqrt(hs)) V, by SDPA except in CPU training."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        # Query, key and value projections stacked in one (3H, H) matrix: one matrix product,
        # not three. model_folder.py stacks the checkpoint's three as it loads and splits them
        # as it saves.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, keep, packing=None):
        """x (B, T, H) -> (B, T, H); unpadded, x (N, H) -> (N, H): the real tokens of a Packing."""
        qkv = self.qkv(x)  # (B, T, 3H), or (N, 3H)
        if packing is None:
            y = self.attend_padded(qkv, keep)
        elif x.device.type == "cuda":  # unpadded: one kernel for all sequences (Packing.attend)
            y = packing.attend(qkv, self.n_head, self.dropout_p if self.training else 0.0)
        else:  # unpadded on the CPU: sequences of like length attend together (Packing.group)
            y = packing.ungroup([self.attend_padded(x_g, keep) for x_g, keep in packing.group(qkv)])
        return self.out(y)

    def attend_padded(self, qkv, keep):
        """(B, T, 3H) -> (B, T, H): the heads' attention over a padded batch; keep as in attend."""
        (B, T, _), H, nh = qkv.shape, qkv.shape[2] // 3, self.n_head
        # (B, T, 3H) -> (B, T, 3, nh, hs) -> (3, B, nh, T, hs) -> q, k, v, each (B, nh, T, hs)
        q, k, v = qkv.view(B, T, 3, nh, H // nh).permute(2, 0, 3, 1, 4).unbind(0)
        return self.attend(q, k, v, keep).transpose(1, 2).reshape(B, T, H)  # -> (B, T, H)

    def attend(self, q, k, v, keep):
        """(..., T, hs) -> (..., T, hs): softmax(q k^T / sqrt(hs)) v, with dropout in training."""
        if self.training and self.dropout_p > 0 and q.device.type == "cpu":
            return self._attend_with_dropout(q, k, v, keep)
        # keep: (B, 1, 1, T) boolean, True = this key may be attended to; None = no padding,
        # which lets SDPA pick its fastest kernel. A query whose keys are all masked (an
        # all-padding row) gets zeros from SDPA, not NaN.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                              dropout_p=self.dropout_p if self.training else 0.0)

    def _attend_with_dropout(self, q, k, v, keep):
        """SDPA's own math for CPU training, where SDPA draws costlier bernoulli_ masks. A row with
        all keys masked gets uniform weights (SDPA: zeros); training rows hold [CLS] and [SEP]."""
        # Scaling q is the cheaper side. Masked in place: the product's backward needs q, k only.
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, nh, T, T)
        if keep is not None:
            scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
        weights = dropout(scores.softmax(-1), self.dropout_p, training=True)
        return weights @ v  # (B, nh, T, hs)


class Layer(nn.Module):
    """One post-LN transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        attention_dropout = FAMILIES[config.model_type].attention_output_dropout
        self.attn_dropout = Dropout(config.hidden_dropout_prob if attention_dropout else 0.0)

    def forward(self, x, keep, packing=None):
        # x: (B, T, H), or (N, H) packed; I = intermediate_size
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, keep, packing)))
        h = F.gelu(self.ffn_in(x))  # (B, T, I); the exact erf GELU, as BERT was trained
        return self.ffn_norm(x + self.dropout(self.ffn_out(h)))  # (B, T, H)


class Packing:
    """The unpadded path: where a batch's real tokens are, so that only they are computed.
    All of a layer but attention works token by token, so it runs on the N real tokens packed into
    one (N + R, H) tensor (R rounding rows: cpu_attention.rounding). Attention reads a sequence's
    tokens together: in groups of like length on the CPU (group), as nested tensors on a GPU."""

    def __init__(self, attention_mask, rounds=None):
        self.shape = attention_mask.shape  # (B, T)
        self.real = attention_mask.flatten().nonzero().squeeze(1)  # (N,): their places in B * T
        self.n, self.rounding = len(self.real), cpu_attention.rounding(self.real.device, rounds)
        self.index = F.pad(self.real, (0, -self.n % self.rounding[0]))  # (N + R,): R times token 0
        lengths = attention_mask.sum(1)  # (B,)
        self.offsets = F.pad(lengths.cumsum(0), (1, 0))  # (B + 1,): each sequence's start, then N
        self.lengths = lengths.tolist()
        self.groups = None  # the CPU's attention groups (group): cpu_attention.Groups

    def pack(self, x):
        """(B, T, ...) -> (N + R, ...): the real tokens, row after row, then R rounding rows."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x):
        """(N + R, ...) -> (B, T, ...), with zeros where the padding was."""
        out = x.new_zeros(self.shape.numel(), *x.shape[1:]).index_copy(0, self.real, x[:self.n])
        return out.view(*self.shape, *x.shape[1:])

    def attend(self, qkv, n_head, dropout_p):
        """(N, 3H) -> (N, H): attention per sequence, by SDPA on nested jagged tensors."""
        # q, k, v: each (N, nh, hs)
        q, k, v = (t.contiguous() for t in qkv.view(len(qkv), 3, n_head, -1).unbind(1))
        nested = [torch.nested.nested_tensor_from_jagged(t, self.offsets).transpose(1, 2)
                  for t in (q, k, v)]
        y = F.scaled_dot_product_attention(*nested, dropout_p=dropout_p)  # (B, nh, j, hs), j jagged
        return y.transpose(1, 2).values().flatten(1)  # (N, nh, hs) -> (N, H)

    def group(self, x):
        """(N + R, C) -> [(x_g, keep_g)] per group of like-length sequences (cpu_attention.plan):
        x_g (n_g, T_g, C), padded with zeros to the longest; keep_g, its real keys (attend)."""
        g = self.groups = self.groups or cpu_attention.plan(self.lengths, x, self.rounding[1])
        x = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, g.rows)  # last row: padding
        parts = zip(x.split(g.sizes), g.counts, g.keeps)
        return [(x_g.view(n, -1, x.shape[1]), keep) for x_g, n, keep in parts]

    def ungroup(self, parts):
        """[(n_g, T_g, C)] -> (N + R, C): group's inverse, the real tokens back in packing order."""
        return torch.cat([part.flatten(0, 1) for part in parts]).index_select(0, self.groups.back)


UNPAD = ("auto", "always", "never")  # Bert.unpad: which padded batches run unpadded (Bert.packs)
PACK_FROM = 0.2  # auto packs a CPU batch from this share of padding up: faster there, slower below


class Bert(nn.Module):
    """The encoder: embeddings, L layers, and the pooler (dense + tanh on [CLS]) if the checkpoint
    has one; without it, "pooled" is the first token's final state: no random pooler is used."""

    def __init__(self, config, unpad="auto"):
        super().__init__()
        self.config, self.unpad = config, unpad
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = (nn.Linear(config.hidden_size, config.hidden_size)
                       if config.has_pooler else None)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) -> hidden (B, T, H), pooled (B, H)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # The one place the 1 = keep mask becomes SDPA's boolean mask: (B, T) -> (B, 1, 1, T),
        # broadcast over heads and queries. A batch without padding needs no mask (None) and is not
        # packed. The checks wait for the device, and would split a compiled graph.
        keep, packing = None, None
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]
            if not torch.compiler.is_compiling():
                if keep.all():
                    keep = None
                elif self.packs(attention_mask):
                    packing = Packing(attention_mask)
        x = self.embeddings(input_ids, token_type_ids, packing)  # (B, T, H), or unpadded (N, H)
        for layer in self.layers:
            x = layer(x, keep, packing)
        x = x if packing is None else packing.unpack(x)  # (N, H) -> (B, T, H), zeros at padding
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else x[:, 0]  # (B, H)
        return x, pooled

    def packs(self, attention_mask):
        """Whether a batch with padding runs unpadded (self.unpad). auto: on the CPU from PACK_FROM
        padding up, so random batches pack and length-grouped ones do not (docs/performance.md);
        a GPU pads, as packing is not measured there."""
        if self.unpad != "auto":
            return self.unpad == "always"
        return (attention_mask.device.type == "cpu"
                and 1 - attention_mask.float().mean() >= PACK_FROM)


# --- Sentence embeddings (Task 1) ----------------------------------------------

POOLS = ("mean", "cls", "max")
NORMS = ("none", "l1", "l2")


def pool_tokens(hidden, pooled, attention_mask, pool):
    """Reduce token states (B, T, H) to one vector per sentence (B, H).

    mean: average of the real tokens; cls: the pooler output (dense + tanh on [CLS]), or the first
    token's state where the model has no pooler; max: per-feature maximum over the real tokens.
    Padding never counts; for mean and max a row with no real tokens pools to zeros.
    """
    if pool == "cls":
        return pooled
    real = attention_mask.bool()[:, :, None]  # (B, T, 1)
    if pool == "mean":
        total = hidden.masked_fill(~real, 0).sum(dim=1)  # (B, H)
        return total / real.sum(dim=1).clamp(min=1)
    if pool == "max":
        # Padding gets the lowest finite value of the dtype, so it can never win.
        lowest = torch.finfo(hidden.dtype).min
        best = hidden.masked_fill(~real, lowest).amax(dim=1)  # (B, H)
        return best.masked_fill(~real.any(dim=1), 0)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def normalize_rows(x, norm):
    """Divide each row by its L1 or L2 norm; an all-zero row stays zero."""
    if norm == "none":
        return x
    p = {"l1": 1, "l2": 2}[norm]
    # tiny is the smallest normal number of the dtype: a floor that is never
    # rounded to zero, in fp16 included.
    return x / x.norm(p=p, dim=-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


class SentenceEncoder(nn.Module):
    """BERT -> pooling -> optional projection to embed_dim -> optional L1/L2 normalization."""

    def __init__(self, bert, pool="mean", embed_dim=None, normalize=None):
        super().__init__()
        normalize = normalize or "none"
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if normalize not in NORMS:
            raise ValueError(f"normalize must be one of {NORMS}, got {normalize!r}")
        self.bert, self.pool, self.norm = bert, pool, normalize
        # The projection is new and untrained: it starts random and learns with a task.
        self.project = nn.Linear(bert.config.hidden_size, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or bert.config.hidden_size

    def forward(self, input_ids, attention_mask):
        hidden, pooled = self.bert(input_ids, attention_mask)
        return self.finish(pool_tokens(hidden, pooled, attention_mask, self.pool))  # (B, D)

    def finish(self, x):
        """Pooled vectors (B, H) -> embeddings (B, D): optional projection, then normalization."""
        if self.project is not None:
            x = self.project(x)  # (B, H) -> (B, D)
        return normalize_rows(x, self.norm)

    @torch.no_grad()
    def encode(self, texts, tokenizer, batch_size=32, max_len=None):
        """Embed a list of strings in batches: a float32 (N, D) tensor on the CPU. Inputs longer
        than max_len word pieces (default: the model's limit) keep their first max_len - 1 pieces
        and the final [SEP]."""
        limit = self.bert.config.max_len
        max_len = max_len or limit
        if not 2 <= max_len <= limit:
            raise ValueError(f"max_len must be between 2 and {limit} (the model's positions), "
                             f"got {max_len}")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            encodings = tokenizer.encode_batch(texts[start:start + batch_size])
            rows = [torch.tensor(e.ids if len(e.ids) <= max_len
                                 else e.ids[:max_len - 1] + e.ids[-1:]) for e in encodings]
            input_ids = nn.utils.rnn.pad_sequence(rows, batch_first=True,
                                                  padding_value=self.bert.config.pad_token_id)
            attention_mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows],
                                                       batch_first=True)
            out.append(self(input_ids.to(device), attention_mask.to(device)).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)


# --- Multi-task model (Task 2) -------------------------------------------------------

class Head(nn.Module):
    """A task head: dropout -> dense -> LayerNorm -> GELU -> projection to the task's labels."""

    def __init__(self, in_dim, n_labels, dropout=0.1, eps=1e-12):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.dense = nn.Linear(in_dim, in_dim)
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.out = nn.Linear(in_dim, n_labels)

    def forward(self, x):
        # (..., in_dim) -> (..., n_labels): (B, D) for a sentence, (B, T, H) for tokens
        return self.out(F.gelu(self.norm(self.dense(self.dropout(x)))))


class MultiTaskModel(nn.Module):
    """One shared encoder, one head per task, kept in `heads` by task name. A sentence-level
    task's head reads the sentence embedding, as SentenceEncoder makes it; a word-level task's
    head reads every token state, because pooling would blur the words it has to tag. A batch
    holds one task, and forward runs only that task's head."""
    SECTION, WRITTEN_BY = "multitask", "train.py"  # its section in a model folder (model_folder.py)

    def __init__(self, encoder, tasks=None, head_dropout=0.1):
        """encoder: the SentenceEncoder of Task 1 (BERT, pooling, projection, normalization);
        tasks: rows of the task table (tasks.Task, with their labels), by default the seed's two."""
        super().__init__()
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks or [TASKS[name] for name in SEED_TASKS]}
        config = encoder.bert.config
        width = {"sentence": encoder.embed_dim, "word": config.hidden_size}  # what a head reads
        self.heads = nn.ModuleDict({
            name: Head(width[t.level], len(t.labels), head_dropout, config.layer_norm_eps)
            for name, t in self.tasks.items()})

    @classmethod
    def from_settings(cls, bert, settings):
        """The model that settings() describes (config.json keeps them), on this bert."""
        encoder = SentenceEncoder(bert, settings["pool"], settings["embed_dim"],
                                  settings["normalize"])
        tasks = [Task(**{**card, "labels": tuple(card["labels"])}) for card in settings["tasks"]]
        return cls(encoder, tasks, settings["head_dropout"])

    @property
    def bert(self):
        return self.encoder.bert

    def forward(self, input_ids, attention_mask, task, features=None):
        """Logits of a task's head: (B, labels) at sentence level, (B, T, labels) at word level.
        features: what the head reads, if computed already (a frozen backbone's stored outputs,
        support/features.py); then the encoder does not run."""
        if features is None:
            features = self.features(input_ids, attention_mask, task)
        return self.head(features, task)

    def features(self, input_ids, attention_mask, task):
        """What a task's head reads: pooled vectors (B, H) or token states (B, T, H)."""
        hidden, pooled = self.bert(input_ids, attention_mask)
        if self.tasks[task].level == "word":
            return hidden
        return pool_tokens(hidden, pooled, attention_mask, self.encoder.pool)

    def head(self, features, task):
        """The rest of the step: a sentence vector's projection and normalization, then the head."""
        if self.tasks[task].level == "sentence":
            features = self.encoder.finish(features)
        return self.heads[task](features)

    def unread_parts(self, task):
        """Parts a step of this task never reads: the other heads, the sentence projection at word
        level, and the pooler unless a sentence-level task reads it (--pool cls)."""
        unread = {f"{name}_head" for name in self.heads if name != task}
        if self.tasks[task].level == "word":
            return unread | {"project", "pooler"}
        return unread if self.encoder.pool == "cls" else unread | {"pooler"}

    def settings(self):
        """What, beyond the BERT config, rebuilds this model (stored in config.json)."""
        embed_dim = None if self.encoder.project is None else self.encoder.embed_dim
        return {"pool": self.encoder.pool, "embed_dim": embed_dim, "normalize": self.encoder.norm,
                "head_dropout": next(iter(self.heads.values())).dropout.p,
                "tasks": [t.card() for t in self.tasks.values()]}


def parameter_part(name):
    """The part a parameter belongs to: the unit of freezing (freeze.py) and learning rates (lr.py).

    The encoder's parts are "embeddings", "layer.{i}" and "pooler"; the
    sentence projection (encoder.project), shared by every sentence-level
    head, is "project"; a task's head is "<task>_head" ("ner_head"), and
    any other module of a model is named by its attribute ("cls_head").
    """
    if name.startswith("encoder.project."):
        return "project"
    if name.startswith("heads."):
        return name.split(".")[1] + "_head"
    if not name.startswith("encoder.bert."):
        return name.split(".")[0]
    inner = name.removeprefix("encoder.bert.")
    return "layer." + inner.split(".")[1] if inner.startswith("layers.") else inner.split(".")[0]
