"""The BERT encoder, written out in full, and sentence embeddings on top of it.

Follows Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers
for Language Understanding" (2019), and matches the numerics of Hugging Face
`transformers.BertModel` (tests/test_model.py proves it to 1e-5 in fp32).
RoBERTa (Liu et al., 2019) and DistilBERT (Sanh et al., 2019) are the same
post-LN encoder with other names, other position numbers, no token types or
no pooler: FAMILIES holds those differences as data, and one class runs all
three (tests/test_families.py matches RobertaModel and DistilBertModel).

Reading order:
  the encoder   BertConfig -> Embeddings -> SelfAttention -> Layer -> Bert
                (encoder + pooler), then the CPU dropout they use
  loading       FAMILIES (what each model_type names differently) ->
                read_config (config.json, checked) -> the rename tables ->
                load_pretrained (weights from a safetensors file)
  Task 1        pool_tokens / SentenceEncoder: one vector per sentence
  Task 2        Head / MultiTaskModel: one encoder, two task heads, and
                save_trained / load_multitask for a trained model folder
  pairs         PairModel: a bi-encoder or a cross-encoder (pairs.py), and load_pairs

Masks follow the Hugging Face convention everywhere: attention_mask is (B, T)
with 1 = a real token, 0 = padding.
"""

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from runtime import atomic_write


# --- The encoder --------------------------------------------------------------------

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
    model_type: str = "bert"  # bert | roberta | distilbert: which names the checkpoint uses (FAMILIES)
    has_pooler: bool = True  # False when the checkpoint holds no pooler (the hub's RoBERTa and DistilBERT)

    @property
    def position_start(self):
        """Position id of the first real token: 0, or pad_token_id + 1 (RoBERTa)."""
        return self.pad_token_id + 1 if FAMILIES[self.model_type].positions_after_padding else 0

    @property
    def attention_output_dropout(self):
        """False for DistilBERT, whose attention output goes to LayerNorm as it is."""
        return FAMILIES[self.model_type].attention_output_dropout

    @property
    def max_len(self):
        """The longest input in word pieces: the position table, less the ids RoBERTa skips."""
        return self.max_position_embeddings - self.position_start

    @classmethod
    def from_json(cls, path):
        """Read and check a Hugging Face config.json (read_config, with the loading code below)."""
        return read_config(path)


class Embeddings(nn.Module):
    """Token id + position + segment embeddings, then LayerNorm and dropout.

    DistilBERT has no segment embeddings (type_vocab_size 0).
    """

    def __init__(self, config):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.position_start, self.pad_id = config.position_start, config.pad_token_id

    def forward(self, input_ids, token_type_ids):
        if self.position_start:
            # RoBERTa numbers the real tokens pad_token_id + 1, + 2, ... and gives padding
            # pad_token_id, as transformers' create_position_ids_from_input_ids does.
            real = (input_ids != self.pad_id).long()  # (B, T)
            positions = torch.cumsum(real, dim=1) * real + (self.position_start - 1)  # (B, T)
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(positions)  # (B, T, H)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention; softmax(QK^T / sqrt(hs)) V runs in SDPA (in CPU training, written out)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        # Query, key and value projections stacked in one (3H, H) matrix: one
        # matrix product instead of three. load_pretrained stacks the
        # checkpoint's three matrices; save_trained splits them again.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, keep):
        B, T, H = x.shape
        hs = H // self.n_head
        # (B, T, 3H) -> (B, T, 3, nh, hs) -> (3, B, nh, T, hs) -> q, k, v, each (B, nh, T, hs)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4).unbind(0)
        if self.training and self.dropout_p > 0 and x.device.type == "cpu":
            y = self._attend_with_dropout(q, k, v, keep)
        else:
            # keep: (B, 1, 1, T) boolean, True = this key may be attended to; None = no padding,
            # which lets SDPA pick its fastest kernel. A query whose keys are all masked (an
            # all-padding row) gets zeros from SDPA, not NaN: checked on CPU and CUDA.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                               dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, H)  # (B, nh, T, hs) -> (B, T, H)
        return self.out(y)

    def _attend_with_dropout(self, q, k, v, keep):
        """SDPA's own math, written out for CPU training.

        SDPA has no CPU kernel that applies dropout, so it falls back to these
        same steps but draws the dropout mask with bernoulli_; dropout() is
        cheaper. A row with every key masked would get uniform weights here
        (SDPA gives zeros); training rows always hold [CLS] and [SEP], so none is.
        """
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, nh, T, T); scaling q is the cheaper side
        if keep is not None:
            scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)  # in place: the product's backward needs q, k only
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
        self.attn_dropout = Dropout(config.hidden_dropout_prob if config.attention_output_dropout else 0.0)

    def forward(self, x, keep):
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, keep)))  # (B, T, H)
        h = F.gelu(self.ffn_in(x))  # (B, T, I), I = intermediate_size; exact erf GELU, as BERT was trained
        return self.ffn_norm(x + self.dropout(self.ffn_out(h)))  # (B, T, H)


class Bert(nn.Module):
    """The encoder: embeddings, L layers, and the pooler (dense + tanh on [CLS]).

    A checkpoint without pooler weights gives a Bert without a pooler
    (config.has_pooler False), whose "pooled" output is then the first
    token's final state as it is: no random pooler is ever used.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if config.has_pooler else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) -> hidden (B, T, H), pooled (B, H)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # The one place the 1 = keep mask becomes SDPA's boolean mask:
        # (B, T) -> (B, 1, 1, T), broadcast over heads and query positions.
        # A batch without padding needs no mask (None), and SDPA then has its
        # fastest kernels to choose from. The check reads one value back from
        # the device (on a GPU, a wait for the work queued so far), and it is
        # skipped inside torch.compile, where it would split the graph.
        keep = None
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]
            if not torch.compiler.is_compiling() and keep.all():
                keep = None
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, keep)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else x[:, 0]  # (B, H), from [CLS]
        return x, pooled


# --- Dropout on the CPU ------------------------------------------------------------

def dropout(x, p, training):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p).

    The same distribution as F.dropout. On the CPU, F.dropout draws its mask
    with bernoulli_, which costs about twice as much as drawing uniform numbers
    and comparing them with p; forward and backward together, this version takes
    ~0.7x the time (bench.py shows the effect on a whole step). On a GPU,
    F.dropout's fused kernel is faster.
    """
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    # fp32 uniforms whatever x's dtype, so p is exact to 2^-24; mask is 0 or 1 / (1 - p)
    mask = torch.rand(x.shape, device=x.device).ge_(p).mul_(1 / (1 - p)).to(x.dtype)
    return x * mask


class Dropout(nn.Module):
    """nn.Dropout through dropout() above."""

    def __init__(self, p):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)


# --- Loading pretrained weights -------------------------------------------------

class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message is one line naming the file."""


@dataclass(frozen=True)
class Family:
    """What one model_type changes around the same encoder: names, and a few facts."""
    prefix: str  # the masked-LM file the hub serves puts every encoder tensor under this
    heads: tuple  # prefixes of that file's pre-training heads, which are dropped
    config_keys: dict  # config.json key -> BertConfig field, where the names differ
    layer_prefix: str  # where layer i sits: f"{layer_prefix}.{i}"
    top_names: dict  # our modules outside the layers -> the checkpoint's
    layer_names: dict  # our modules inside a layer -> the checkpoint's (a tuple: stacked into one)
    positions_after_padding: bool = False  # position ids start at pad_token_id + 1 (RoBERTa)
    attention_output_dropout: bool = True  # DistilBERT has no dropout on the attention block's output
    defaults: dict = None  # BertConfig fields whose default (as transformers has it) differs for this family


# Linear weights need no transpose anywhere: all store (out_features, in_features).
_BERT_TOP = {"embeddings.word": "embeddings.word_embeddings", "embeddings.position": "embeddings.position_embeddings",
             "embeddings.token_type": "embeddings.token_type_embeddings", "embeddings.norm": "embeddings.LayerNorm",
             "pooler": "pooler.dense"}
_BERT_LAYER = {
    "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),  # stacked
    "attn.out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
FAMILIES = {
    "bert": Family(prefix="bert.", heads=("cls.",), config_keys={}, layer_prefix="encoder.layer",
                   top_names=_BERT_TOP, layer_names=_BERT_LAYER),
    # RoBERTa: BERT's names and config keys; positions counted after the padding id; one token type.
    "roberta": Family(prefix="roberta.", heads=("lm_head.",), config_keys={}, layer_prefix="encoder.layer",
                      top_names=_BERT_TOP, layer_names=_BERT_LAYER, positions_after_padding=True,
                      defaults={"pad_token_id": 1}),
    # DistilBERT: its own names and config keys; no token types and no pooler.
    "distilbert": Family(
        prefix="distilbert.", heads=("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
        config_keys={"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                     "hidden_dim": "intermediate_size", "dropout": "hidden_dropout_prob",
                     "attention_dropout": "attention_probs_dropout_prob", "activation": "hidden_act"},
        layer_prefix="transformer.layer",
        top_names={k: v for k, v in _BERT_TOP.items() if k in ("embeddings.word", "embeddings.position",
                                                                 "embeddings.norm")},
        layer_names={"attn.qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
                     "attn.out": "attention.out_lin", "attn_norm": "sa_layer_norm", "ffn_in": "ffn.lin1",
                     "ffn_out": "ffn.lin2", "ffn_norm": "output_layer_norm"},
        attention_output_dropout=False,
        defaults={"type_vocab_size": 0, "num_hidden_layers": 6, "layer_norm_eps": 1e-12}),  # eps: fixed in its code
}
FAMILY_FIELDS = ("model_type", "has_pooler")  # not config.json keys
JSON_FIELDS = [f for f in fields(BertConfig) if f.name not in FAMILY_FIELDS]


def config_json(config):
    """A BertConfig as its family's config.json keys (the inverse of read_config), e.g. for save_trained."""
    theirs = {ours: key for key, ours in FAMILIES[config.model_type].config_keys.items()}
    values = {theirs.get(f.name, f.name): getattr(config, f.name) for f in JSON_FIELDS}
    return {"model_type": config.model_type, theirs.get("hidden_act", "hidden_act"): "gelu", **values}


DOWNLOAD_HINT = "; `python download.py` fetches bert-base-uncased, `--only NAME` another backbone"


def read_config(path):
    """A BertConfig from a Hugging Face config.json of a supported model_type: the fields BertConfig
    has (under the family's key names), each checked; the rest ignored."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a model folder needs config.json{DOWNLOAD_HINT})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type", "bert")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; "
                              f"this encoder reads {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    raw = {family.config_keys.get(k, k): v for k, v in raw.items()}
    # BERT uses the exact, erf-based GELU. The tanh approximation
    # ("gelu_new") differs by up to ~1e-3 and would break parity.
    if raw.get("hidden_act", "gelu") != "gelu":
        key = next((k for k, v in family.config_keys.items() if v == "hidden_act"), "hidden_act")
        raise CheckpointError(f"{path}: {key} {raw['hidden_act']!r} is not supported (only 'gelu')")
    if raw.get("position_embedding_type", "absolute") != "absolute" or raw.get("sinusoidal_pos_embds"):
        raise CheckpointError(f"{path}: {model_type} with positions other than learned absolute ones is not "
                              "supported (position_embedding_type, sinusoidal_pos_embds)")
    values = {}
    for f in JSON_FIELDS:  # check every value: a bad one would fail later, far from its cause
        value = raw.get(f.name, (family.defaults or {}).get(f.name, f.default))
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if f.type is int:
            lowest = 0 if f.name in ("pad_token_id", "type_vocab_size") else 1
            if not (is_number and isinstance(value, int) and value >= lowest):
                raise CheckpointError(f"{path}: {f.name} must be a whole number >= {lowest}, found {value!r}")
        elif not (is_number and 0 <= value < 1):
            raise CheckpointError(f"{path}: {f.name} must be a number in [0, 1), found {value!r}")
        values[f.name] = value
    config = BertConfig(**values, model_type=model_type)
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(f"{path}: hidden_size {config.hidden_size} is not divisible "
                              f"by num_attention_heads {config.num_attention_heads}")
    if config.pad_token_id >= config.vocab_size:
        raise CheckpointError(f"{path}: pad_token_id {config.pad_token_id} is outside the vocabulary "
                              f"of {config.vocab_size}")
    if config.max_len < 2:
        raise CheckpointError(f"{path}: max_position_embeddings {config.max_position_embeddings} leaves no room "
                              f"for positions that start at {config.position_start}")
    return config


def checkpoint_names(ours, family="bert"):
    """The checkpoint tensors behind one of our parameters, in stacking order (plain layout).

    'layers.0.ffn_norm.bias' -> ['encoder.layer.0.output.LayerNorm.bias'];
    'layers.3.attn.qkv.weight' -> the query, key and value weights of
    encoder.layer.3, which our fused projection stacks along dim 0.
    """
    family = FAMILIES[family]
    module, _, suffix = ours.rpartition(".")
    if module.startswith("layers."):
        _, i, inner = module.split(".", 2)
        theirs = family.layer_names[inner]
        return [f"{family.layer_prefix}.{i}.{t}.{suffix}" for t in ((theirs,) if isinstance(theirs, str) else theirs)]
    return [f"{family.top_names[module]}.{suffix}"]


def to_checkpoint(ours, tensor, family="bert"):
    """Our parameter -> {checkpoint name: tensor}, unstacking the fused projection."""
    names = checkpoint_names(ours, family)
    return dict(zip(names, tensor.chunk(len(names))))


def _plain_name(key, family):
    """Rewrite a key of a model file into the plain layout of its family.

    The masked-LM files the hub serves put every encoder tensor under a
    prefix (`bert.`, `roberta.`, `distilbert.`) next to their pre-training
    heads; the original bert-base-uncased file, converted from TensorFlow,
    also calls LayerNorm parameters gamma/beta. Returns None for tensors the
    encoder does not use: the pre-training heads and the constant
    `position_ids` / `token_type_ids` buffers some exports include.
    """
    key = key.removeprefix(family.prefix)
    if key.startswith(family.heads) or key in ("embeddings.position_ids", "embeddings.token_type_ids"):
        return None
    if ".LayerNorm." in key:
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
    return key


def _list_keys(keys, limit=5):
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(model_dir, device="cpu"):
    """Build a Bert from model_dir/config.json and copy in model_dir/model.safetensors.

    The file may be in its family's plain (base-model) layout or in the
    masked-LM layout the hub serves. Every weight must be present with the
    shape config.json implies, and no tensor may be left unexplained;
    otherwise CheckpointError names the keys. Only the pooler may be absent:
    then the model has none (Bert explains what "pooled" is then).
    """
    model_dir = Path(model_dir)
    config = BertConfig.from_json(model_dir / "config.json")
    family = FAMILIES[config.model_type]
    path = model_dir / "model.safetensors"
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found{DOWNLOAD_HINT}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    # A model trained by train.py or pairs.py (save_trained) also holds its heads; they are not BERT's.
    sections = tuple(f"{s}." for s in TRAINED_SECTIONS if s in json.loads((model_dir / "config.json").read_text()))
    renamed = {}
    for key, tensor in tensors.items():
        if sections and key.startswith(sections):
            continue
        name = _plain_name(key, family)
        if name is None:
            continue
        if name in renamed:
            raise CheckpointError(f"{path}: two tensors are named {name} once legacy names are read")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {key} holds {tensor.dtype}, not floating-point weights")
        if not torch.isfinite(tensor).all():  # a damaged or diverged file: every output would be NaN
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
        renamed[name] = tensor
    model = Bert(replace(config, has_pooler=any(name.startswith("pooler.") for name in renamed)))
    params = dict(model.named_parameters())
    names = {ours: checkpoint_names(ours, config.model_type) for ours in params}  # ours -> theirs
    wanted = {theirs: (ours, len(group)) for ours, group in names.items() for theirs in group}
    missing = wanted.keys() - renamed.keys()
    unexpected = renamed.keys() - wanted.keys()
    if missing:
        raise CheckpointError(f"{path}: missing keys: {_list_keys(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys: {_list_keys(unexpected)}")

    def expected_shape(ours, parts):  # one of `parts` stacked tensors has 1/parts of the rows
        shape = params[ours].shape
        return (shape[0] // parts, *shape[1:])

    wrong = [f"{theirs} is {tuple(renamed[theirs].shape)}, config.json implies {expected_shape(ours, parts)}"
             for theirs, (ours, parts) in sorted(wanted.items())
             if tuple(renamed[theirs].shape) != expected_shape(ours, parts)]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(wrong[:3])}"
                              + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    with torch.no_grad():
        for ours, group in names.items():
            # copy_ also casts, e.g. fp16 files to fp32
            params[ours].copy_(torch.cat([renamed[theirs] for theirs in group]))
    return model.to(device)


# --- Sentence embeddings (Task 1) ----------------------------------------------

POOLS = ("mean", "cls", "max")
NORMS = ("none", "l1", "l2")


def pooling_note(config, pool):
    """The one line a tool prints when --pool cls meets a checkpoint without a pooler, else None."""
    if pool == "cls" and not config.has_pooler:
        return (f"--pool cls: this {config.model_type} checkpoint has no pooler weights, so cls pooling reads the "
                "first token's final state as it is (no dense + tanh)")
    return None


def pool_tokens(hidden, pooled, attention_mask, pool):
    """Reduce token states (B, T, H) to one vector per sentence (B, H).

    mean: average of the real tokens; cls: the pooler output (dense + tanh on
    [CLS]), or the first token's state where the model has no pooler; max:
    per-feature maximum over the real tokens. Padding never counts,
    and for mean and max a row with no real tokens pools to zeros (cls reads
    position 0 whatever it holds).
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
    """BERT -> pooling -> optional linear projection to embed_dim -> optional L1/L2 normalization."""

    def __init__(self, bert, pool="mean", embed_dim=None, normalize=None):
        super().__init__()
        normalize = normalize or "none"
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if normalize not in NORMS:
            raise ValueError(f"normalize must be one of {NORMS}, got {normalize!r}")
        self.bert = bert
        self.pool = pool
        self.norm = normalize
        hidden = bert.config.hidden_size
        # The projection is new and untrained: it starts random and learns with a task.
        self.project = nn.Linear(hidden, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or hidden

    def forward(self, input_ids, attention_mask):
        hidden, pooled = self.bert(input_ids, attention_mask)
        return self.finish(pool_tokens(hidden, pooled, attention_mask, self.pool))  # (B, H) -> (B, D)

    def finish(self, x):
        """Pooled vectors (B, H) -> embeddings (B, D): the optional projection, then normalization."""
        if self.project is not None:
            x = self.project(x)  # (B, H) -> (B, D)
        return normalize_rows(x, self.norm)

    @torch.no_grad()
    def encode(self, texts, tokenizer, batch_size=32, max_len=None):
        """Embed a list of strings in batches; returns a float32 (N, D) tensor on the CPU.

        Inputs longer than max_len word pieces (default: the model's limit)
        keep their first max_len - 1 pieces and the final [SEP].
        """
        limit = self.bert.config.max_len
        max_len = max_len or limit
        if not 2 <= max_len <= limit:
            raise ValueError(f"max_len must be between 2 and {limit} (the model's positions), got {max_len}")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            encodings = tokenizer.encode_batch(texts[start:start + batch_size])
            ids = [e.ids if len(e.ids) <= max_len else e.ids[:max_len - 1] + e.ids[-1:] for e in encodings]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), self.bert.config.pad_token_id)
            attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):
                input_ids[row, :len(seq)] = torch.tensor(seq)
                attention_mask[row, :len(seq)] = 1
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
    """One shared encoder, two heads.

    The classification head reads the sentence embedding (pooling ->
    optional projection -> optional normalization, as in SentenceEncoder); the
    NER head reads every token state, because pooling would blur the words
    it has to tag. A batch holds one task, and forward runs only that head.
    """
    SECTION, WRITTEN_BY = "multitask", "train.py"  # save_trained / load_trained: config.json's section

    def __init__(self, bert, pool="mean", embed_dim=None, normalize="none", n_classes=4, n_tags=9,
                 head_dropout=0.1):
        super().__init__()
        self.encoder = SentenceEncoder(bert, pool, embed_dim, normalize)
        eps = bert.config.layer_norm_eps
        self.cls_head = Head(self.encoder.embed_dim, n_classes, head_dropout, eps)
        self.ner_head = Head(bert.config.hidden_size, n_tags, head_dropout, eps)

    @property
    def bert(self):
        return self.encoder.bert

    def forward(self, input_ids, attention_mask, task):
        """task "ag": logits (B, n_classes); task "ner": logits (B, T, n_tags)."""
        return self.head(self.features(input_ids, attention_mask, task), task)

    def features(self, input_ids, attention_mask, task):
        """What a task's head reads from the encoder: pooled vectors (B, H) for ag, token states (B, T, H) for ner.

        With the backbone frozen these never change, so features.py computes them once per example.
        """
        hidden, pooled = self.bert(input_ids, attention_mask)
        return pool_tokens(hidden, pooled, attention_mask, self.encoder.pool) if task == "ag" else hidden

    def head(self, features, task):
        """The trainable rest: projection + normalization + classification head, or the NER head."""
        if task == "ag":
            return self.cls_head(self.encoder.finish(features))
        return self.ner_head(features)

    def settings(self):
        """What, beyond the BERT config, rebuilds this model (stored in config.json)."""
        embed_dim = None if self.encoder.project is None else self.encoder.embed_dim
        return {"pool": self.encoder.pool, "embed_dim": embed_dim,
                "normalize": self.encoder.norm, "n_classes": self.cls_head.out.out_features,
                "n_tags": self.ner_head.out.out_features, "head_dropout": self.cls_head.dropout.p}


def parameter_part(name):
    """Which part of a MultiTaskModel a parameter belongs to, for freezing and learning rates.

    Returns "embeddings", "layer.{i}", "pooler", "cls_head" (with the
    sentence-embedding projection) or "ner_head".
    """
    if name.startswith(("cls_head.", "encoder.project.")):
        return "cls_head"
    if name.startswith("ner_head."):
        return "ner_head"
    inner = name.removeprefix("encoder.bert.")
    if inner.startswith("layers."):
        return "layer." + inner.split(".")[1]
    return inner.split(".")[0]  # "embeddings" or "pooler"


TRAINED_SECTIONS = ("multitask", "pairs")  # config.json's settings, and the tensors' prefix, of a trained model


def save_trained(model, out_dir, extra=None):
    """Write out_dir/model.safetensors and config.json, atomically, for a MultiTaskModel or a PairModel.

    The encoder's tensors and config.json keep the names of its family's
    plain layout, so load_pretrained (and transformers) read the folder as
    that model; the rest of the model (heads, projection) sits under the
    model's SECTION ("multitask." or "pairs."), and config.json holds its
    settings under the same name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, bert = {}, model.bert.config
    for name, tensor in model.state_dict().items():
        inner = name.removeprefix("encoder.bert.")
        tensor = tensor.detach().to("cpu", torch.float32)
        parts = to_checkpoint(inner, tensor, bert.model_type) if inner != name else {f"{model.SECTION}.{name}": tensor}
        tensors.update((key, t.contiguous()) for key, t in parts.items())
    config = {**config_json(bert), model.SECTION: model.settings(), **(extra or {})}
    # The weights first: a folder gets its config.json only once its weights are whole, so a write
    # that fails (a full disk) never leaves a config.json that promises a missing model.safetensors.
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


save_multitask = save_trained


def trained_settings(model_dir, section):
    """The settings config.json holds under section ("multitask" or "pairs"), or None for a plain model folder."""
    path = Path(model_dir) / "config.json"
    try:
        settings = json.loads(path.read_text()).get(section)
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON object ({e})") from None
    return settings if isinstance(settings, dict) else None


def load_trained(model_dir, cls, device="cpu"):
    """A MultiTaskModel or PairModel (cls) from a folder written by save_trained."""
    model_dir = Path(model_dir)
    bert = load_pretrained(model_dir)  # also checks config.json
    settings = trained_settings(model_dir, cls.SECTION)
    if settings is None:
        raise CheckpointError(f"{model_dir / 'config.json'}: has no '{cls.SECTION}' settings; it is a plain BERT "
                              f"folder, or another script's, not a model trained by {cls.WRITTEN_BY}")
    try:
        model = cls(bert, **settings)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: bad '{cls.SECTION}' settings ({e})") from None
    prefix = cls.SECTION + "."
    rest = {k.removeprefix(prefix): v for k, v in load_file(model_dir / "model.safetensors").items()
            if k.startswith(prefix)}
    expected = {n for n in model.state_dict() if not n.startswith("encoder.bert.")}
    if rest.keys() != expected:
        raise CheckpointError(f"{model_dir / 'model.safetensors'}: {cls.SECTION} tensors do not match config.json: "
                              f"missing {_list_keys(expected - rest.keys()) or 'none'}, "
                              f"unexpected {_list_keys(rest.keys() - expected) or 'none'}")
    model.load_state_dict(rest, strict=False)
    return model.to(device)


def load_multitask(model_dir, device="cpu"):
    """A MultiTaskModel from a folder written by train.py."""
    return load_trained(model_dir, MultiTaskModel, device)


# --- Sentence pairs (pairs.py) ---------------------------------------------------------

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
    """
    SECTION, WRITTEN_BY = "pairs", "pairs.py"

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
