"""Model folders on disk: config.json, model.safetensors and the tokenizer files, read in and written back.

A model folder is what the hub serves and what train.py and pairs.py leave
in their run folder: config.json (the shape, and for a trained model the
heads' settings), model.safetensors (the weights) and the tokenizer
(tokenizer.json, or vocab.txt for BERT, or vocab.json + merges.txt for
RoBERTa). model.py's classes never see a file; this module turns files into
them and back, and checks everything on the way in, so that a bad folder
stops with one line (CheckpointError or DataError) that names the file.
It writes only when a script asks: a run folder's model and tokenizer files,
on rank 0 (run_folder.RunFolder), each file atomically.

Weights must fit config.json exactly: a folder whose config.json was
edited by hand (another hidden_size, one layer fewer) stops with the first
tensor that does not fit, never with a half-loaded model. A file missing
from a training run's folder gets a hint that fits a run (it has not saved
a model yet; continue it with --resume), not the hint to download one.

Reading order: NAMES (each family's names for the encoder's tensors and
config keys) -> read_config -> read_weights (rename, check_fit, copy) and
load_pretrained -> save_trained / load_trained (a trained model: the
encoder in its family's layout, the heads beside it) -> the tokenizer files.
"""

import io
import json
import shutil
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from support import checkpoint
from model import Bert, BertConfig, MultiTaskModel, parameter_part
from support.runtime import CheckpointError, DataError, atomic_write, log, read_text
from support.tasks import SEED_TASKS, TASKS


@dataclass(frozen=True)
class Names:
    """How one model_type's files name what model.py calls by its own names."""
    prefix: str  # the masked-LM file the hub serves puts every encoder tensor under this
    heads: tuple  # prefixes of that file's pre-training heads, which are dropped
    config_keys: dict  # config.json key -> BertConfig field, where the names differ
    layer_prefix: str  # where layer i sits: f"{layer_prefix}.{i}"
    top_names: dict  # our modules outside the layers -> the checkpoint's
    layer_names: dict  # our modules inside a layer -> the checkpoint's (a tuple: stacked into one)
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
NAMES = {
    "bert": Names(prefix="bert.", heads=("cls.",), config_keys={}, layer_prefix="encoder.layer",
                  top_names=_BERT_TOP, layer_names=_BERT_LAYER),
    # RoBERTa: BERT's names and config keys, and one token type.
    "roberta": Names(prefix="roberta.", heads=("lm_head.",), config_keys={}, layer_prefix="encoder.layer",
                     top_names=_BERT_TOP, layer_names=_BERT_LAYER, defaults={"pad_token_id": 1}),
    # DistilBERT: its own names and config keys; no token types and no pooler.
    "distilbert": Names(
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
        defaults={"type_vocab_size": 0, "num_hidden_layers": 6, "layer_norm_eps": 1e-12}),  # eps: fixed in its code
}
FAMILY_FIELDS = ("model_type", "has_pooler")  # not config.json keys
JSON_FIELDS = [f for f in fields(BertConfig) if f.name not in FAMILY_FIELDS]


# --- config.json ---------------------------------------------------------------------

def config_json(config):
    """A BertConfig as its family's config.json keys (the inverse of read_config), e.g. for save_trained."""
    theirs = {ours: key for key, ours in NAMES[config.model_type].config_keys.items()}
    values = {theirs.get(f.name, f.name): getattr(config, f.name) for f in JSON_FIELDS}
    return {"model_type": config.model_type, theirs.get("hidden_act", "hidden_act"): "gelu", **values}


DOWNLOAD_HINT = "; `python download.py` fetches bert-base-uncased, `--only NAME` another backbone"
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint", ".lock")  # what a run writes beside its model


def run_hint(model_dir, missing):
    """The end of the line that says model_dir lacks `missing` (config.json, model.safetensors or "tokenizer"),
    for a training run's folder, where the download hint would mislead: what fits the run. None for any
    other folder.

    A run saves its model (weights first, then config.json, then the
    tokenizer files) when its first epoch ends; before that its folder holds
    a lock, and after a stop a checkpoint.
    """
    model_dir = Path(model_dir)
    if not any((model_dir / name).exists() for name in RUN_FILES):
        return None
    if not (model_dir / "config.json").exists() and not (model_dir / "model.safetensors").exists():
        unsaved = f"; {model_dir} is a training run that has not saved a model yet (no epoch has finished)"
        if checkpoint.path_in(model_dir).exists():
            return f"{unsaved}: continue it with --out {model_dir} --resume"
        return f"{unsaved}, and has no checkpoint to continue from: start it again"
    if missing == "tokenizer":
        return (f"; {model_dir} is a training run whose tokenizer files were removed: copy them back from "
                "the model folder it was trained from (its --model)")
    return f"; {model_dir} is a training run whose {missing} was removed: restore the file, or train the run again"


def read_config(path):
    """A BertConfig from a Hugging Face config.json of a supported model_type: the fields BertConfig
    has (under the family's key names), each checked; the rest ignored."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        hint = run_hint(path.parent, "config.json") or f" (a model folder needs config.json{DOWNLOAD_HINT})"
        raise CheckpointError(f"{path}: not found{hint}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type", "bert")
    if model_type not in NAMES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; "
                              f"this encoder reads {', '.join(NAMES)}")
    family = NAMES[model_type]
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



# --- model.safetensors ------------------------------------------------------------

def checkpoint_names(ours, family="bert"):
    """The checkpoint tensors behind one of our parameters, in stacking order (plain layout).

    'layers.0.ffn_norm.bias' -> ['encoder.layer.0.output.LayerNorm.bias'];
    'layers.3.attn.qkv.weight' -> the query, key and value weights of
    encoder.layer.3, which our fused projection stacks along dim 0.
    """
    family = NAMES[family]
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


def check_fit(path, config_path, found, expected):
    """The weights of path (found: name -> shape) against what config_path implies (expected: name ->
    shape). Weights that do not fit, most often because config.json was edited by hand, would stop
    later with a traceback from deep in torch; here they stop with one line that names both files and
    the first tensor that is missing, unexpected or of another shape."""
    fit = f"; the weights do not fit {config_path} (was it edited, or copied from another model?)"
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{path}: missing keys: {_list_keys(missing, limit=1)}{fit}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys: {_list_keys(unexpected, limit=1)}{fit}")
    wrong = sorted(name for name in expected if found[name] != expected[name])
    if wrong:
        first, more = wrong[0], f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"{path}: shape mismatch: {first} is {found[first]}, config.json implies "
                              f"{expected[first]}{more}{fit}")


def read_weights(model_dir):
    """The encoder of a model folder, and the other tensors of a trained model (save_trained): (Bert on
    the CPU, {file name: tensor} of the trained sections, empty for a pretrained folder).

    The file may be in its family's plain (base-model) layout or in the
    masked-LM layout the hub serves. Every weight must be present with the
    shape config.json implies, and no tensor may be left unexplained;
    otherwise CheckpointError names the keys (check_fit). Only the pooler may
    be absent: then the model has none (Bert explains what "pooled" is then).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir / "config.json")
    family = NAMES[config.model_type]
    path = model_dir / "model.safetensors"
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        hint = run_hint(model_dir, "model.safetensors") or DOWNLOAD_HINT
        raise CheckpointError(f"{path}: not found{hint}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    # A model trained by train.py or pairs.py (save_trained) also holds its heads; they are not BERT's.
    raw = json.loads((model_dir / "config.json").read_text())
    sections = tuple(f"{s}." for s in TRAINED_SECTIONS if s in raw)
    cross = CROSS_LAYOUT.get(config.model_type, {}) if raw.get("architectures") == [CROSS_ARCHITECTURE.get(
        config.model_type)] and "pairs" in raw else {}  # a cross-encoder in transformers' layout: theirs -> ours
    tensors.update(_read_heads(model_dir, raw.get("heads_digest"), sections))
    renamed, trained = {}, {}
    for key, tensor in tensors.items():
        key = next((ours + key[len(theirs):] for theirs, ours in cross.items() if key.startswith(theirs + ".")), key)
        own = key.startswith(sections)  # a trained model's own tensor (a head), kept under its file name
        name = key if own else _plain_name(key, family)
        if name is None:
            continue
        if name in renamed:
            raise CheckpointError(f"{path}: two tensors are named {name} once legacy names are read")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {key} holds {tensor.dtype}, not floating-point weights")
        if not torch.isfinite(tensor).all():  # a damaged or diverged file: every output would be NaN
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
        (trained if own else renamed)[name] = tensor
    model = Bert(replace(config, has_pooler=any(name.startswith("pooler.") for name in renamed)))
    params = dict(model.named_parameters())
    names = {ours: checkpoint_names(ours, config.model_type) for ours in params}  # ours -> theirs
    # One of a group's stacked tensors (query, key, value) has 1/len(group) of our parameter's rows.
    expected = {theirs: (params[ours].shape[0] // len(group), *params[ours].shape[1:])
                for ours, group in names.items() for theirs in group}
    check_fit(path, model_dir / "config.json", {name: tuple(t.shape) for name, t in renamed.items()}, expected)
    with torch.no_grad():
        for ours, group in names.items():
            # copy_ also casts, e.g. fp16 files to fp32
            params[ours].copy_(torch.cat([renamed[theirs] for theirs in group]))
    return model, trained


def _read_heads(model_dir, digest, sections):
    """The tensors of model_dir/heads.safetensors, where save_trained keeps a trained model's heads (folders
    written before it held them in model.safetensors); they must be the ones config.json's heads_digest
    names, which the same save wrote last."""
    path = model_dir / HEADS_FILE
    if not path.exists():
        return {}
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if checkpoint.checksum(tensors, {}) != digest:
        raise CheckpointError(f"{path}: not the heads that {model_dir / 'config.json'} was saved with (was a save "
                              "cut short?); continue the run with --resume, or train it again")
    if stray := [key for key in tensors if not key.startswith(sections)]:
        raise CheckpointError(f"{path}: unexpected keys: {_list_keys(stray, limit=1)}; it holds only a trained "
                              f"model's heads, under the name of its settings in config.json")
    return tensors


def load_pretrained(model_dir, device="cpu", new_heads=False):
    """Build a Bert from model_dir/config.json and copy in model_dir/model.safetensors (read_weights).

    A model trained by train.py or pairs.py gives its encoder only. new_heads:
    the caller builds new heads on it (train.py, pairs.py); where that leaves
    trained heads behind, one note line says so: they start again from random.
    """
    bert, trained = read_weights(model_dir)
    inner = [name.split(".", 1)[1] for name in trained]  # "heads.ner.out.weight", "encoder.project.bias"
    heads = sorted({parameter_part(name) for name in inner if not name.startswith("encoder.")})
    # A sentence projection alone is no head: a pairs.py bi-encoder holds nothing else. On stderr, so
    # that a script's output (JSON) stays as it is.
    if heads and new_heads:
        # A projection that modules.json also holds is the business of the line that reads it (flags.py).
        projection = " or its sentence projection" if any(n.startswith("encoder.") for n in inner) and not (
            Path(model_dir) / "modules.json").exists() else ""
        log(f"note: {model_dir} is a trained model; only its encoder is loaded, not its heads ({', '.join(heads)})"
            f"{projection}: a model built on it starts them again from random", file=sys.stderr)
    return bert.to(device)


# --- A trained model -----------------------------------------------------------------

TRAINED_SECTIONS = ("multitask", "pairs")  # config.json's settings, and the tensors' prefix, of a trained model
HEADS_FILE = "heads.safetensors"  # a trained model's heads, beside the encoder that transformers loads

# A pairs.py cross-encoder as transformers' sequence-classification model, which CrossEncoder loads:
# where our pooler and score head sit there (the encoder under its family's prefix). RoBERTa's
# classifier is dense + tanh on the first token, then a projection: our pooler, then our head.
# DistilBERT's has a ReLU where we have none, and a model without a pooler has nothing to map to it:
# those stay in our own layout (cross_encoder_note).
CROSS_ARCHITECTURE = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}
CROSS_LAYOUT = {"bert": {"bert.pooler.dense": "pooler.dense", "classifier": "pairs.cls_head.out"},
                "roberta": {"classifier.dense": "pooler.dense", "classifier.out_proj": "pairs.cls_head.out"}}


def cross_layout(config):
    """Where transformers' sequence-classification model of this backbone keeps our pooler and score head
    (CROSS_LAYOUT's entry), or None where it has no place for them."""
    return CROSS_LAYOUT[config.model_type] if config.model_type in CROSS_LAYOUT and config.has_pooler else None


def cross_encoder_note(config, out_dir):
    """The line a cross-encoder run on this backbone prints when CrossEncoder cannot load it as trained, else None."""
    if cross_layout(config):
        return None
    why = "no pooler" if config.model_type in CROSS_LAYOUT else "a classifier with a ReLU, which ours lacks"
    return (f"note: transformers' {config.model_type} sequence-classification model has {why}: CrossEncoder cannot "
            f"load {out_dir} as trained; sentence_pairs.load_pairs reads it")


def save_trained(model, out_dir, extra=None):
    """Write a MultiTaskModel or a PairModel into out_dir, each file atomically: heads.safetensors,
    model.safetensors and config.json.

    model.safetensors holds the encoder, under the names of its family's
    plain layout, which load_pretrained and transformers' AutoModel read as
    that model. The rest (heads, projection) is in heads.safetensors, under
    the model's SECTION ("multitask." or "pairs."); config.json holds its
    settings under the same name. A cross-encoder is written in transformers'
    sequence-classification layout instead (CROSS_LAYOUT), where it can be.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bert = model.bert.config
    kind = model.settings().get("kind")  # a PairModel's: bi or cross
    cross = (cross_layout(bert) if kind == "cross" else None) or {}
    theirs = {ours: theirs for theirs, ours in cross.items()}
    encoder, heads = {}, {}
    for name, tensor in model.state_dict().items():
        inner = name.removeprefix("encoder.bert.")
        tensor = tensor.detach().to("cpu", torch.float32)
        parts = to_checkpoint(inner, tensor, bert.model_type) if inner != name else {f"{model.SECTION}.{name}": tensor}
        for key, t in parts.items():
            module, _, suffix = key.rpartition(".")
            if cross:  # the encoder under its prefix, the pooler and head where the layout puts them
                key = f"{theirs[module]}.{suffix}" if module in theirs else NAMES[bert.model_type].prefix + key
            (heads if key.startswith(model.SECTION + ".") else encoder)[key] = t.contiguous()
    config = {**config_json(bert), model.SECTION: model.settings(), **(extra or {})}
    if cross:
        config.update(architectures=[CROSS_ARCHITECTURE[bert.model_type]], id2label={"0": "LABEL_0"},
                      label2id={"LABEL_0": 0}, classifier_dropout=model.settings()["head_dropout"],
                      sentence_transformers={"activation_fn": "torch.nn.modules.activation.Sigmoid"})
    # The weights before config.json: a folder gets its config.json only once its weights are whole, so
    # a write that fails (a full disk) never leaves a config.json that promises a missing model.safetensors;
    # and config.json names the heads it was saved with, so a save cut short after the heads is refused.
    if heads:
        config["heads_digest"] = checkpoint.checksum(heads, {})  # sha256 of names, dtypes, shapes and bytes
        atomic_write(out_dir / HEADS_FILE, lambda tmp: save_file(heads, tmp))
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(encoder, tmp))
    atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def trained_settings(model_dir, section):
    """The settings config.json holds under section ("multitask" or "pairs"), or None for a plain model folder."""
    path = Path(model_dir) / "config.json"
    try:
        settings = json.loads(path.read_text()).get(section)
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON object ({e})") from None
    return settings if isinstance(settings, dict) else None


def load_trained(model_dir, cls, device="cpu"):
    """A MultiTaskModel or sentence_pairs.PairModel (cls) from a folder written by save_trained. Its
    heads must fit the settings in config.json, as the encoder must fit the rest (check_fit)."""
    model_dir = Path(model_dir)
    bert, trained = read_weights(model_dir)  # also checks config.json
    settings = trained_settings(model_dir, cls.SECTION)
    if settings is None:
        raise CheckpointError(f"{model_dir / 'config.json'}: has no '{cls.SECTION}' settings; it is a plain BERT "
                              f"folder, or another script's, not a model trained by {cls.WRITTEN_BY}")
    if cls is MultiTaskModel and "tasks" not in settings:
        settings, trained = legacy_multitask(settings, trained)
    try:
        model = cls.from_settings(bert, settings)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: bad '{cls.SECTION}' settings ({e})") from None
    prefix = cls.SECTION + "."
    rest = {name: t for name, t in trained.items() if name.startswith(prefix)}  # under the file's names
    expected = {prefix + name: tuple(t.shape) for name, t in model.state_dict().items()
                if not name.startswith("encoder.bert.")}
    heads_path = model_dir / (HEADS_FILE if (model_dir / HEADS_FILE).exists() else "model.safetensors")
    check_fit(heads_path, model_dir / "config.json", {name: tuple(t.shape) for name, t in rest.items()}, expected)
    model.load_state_dict({name.removeprefix(prefix): t for name, t in rest.items()}, strict=False)
    return model.to(device)


def legacy_multitask(settings, tensors):
    """A run folder of train.py from before tasks were data: its settings held n_classes and n_tags, and
    its heads were cls_head and ner_head, for the seed's two tasks. Returns its settings and tensors as
    train.py writes them now (a task list; a head per task under heads.<name>)."""
    settings = dict(settings)
    counts = [settings.pop("n_classes", 4), settings.pop("n_tags", 9)]
    tasks = [TASKS[name] for name in SEED_TASKS]
    settings["tasks"] = [{**t.card(), "labels": list(t.labels) if len(t.labels) == n else [str(i) for i in range(n)]}
                         for t, n in zip(tasks, counts)]
    renames = {f"{MultiTaskModel.SECTION}.{old}.": f"{MultiTaskModel.SECTION}.heads.{t.name}."
               for old, t in zip(("cls_head", "ner_head"), tasks)}
    return settings, {next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), key): t
                      for key, t in tensors.items()}


def load_multitask(model_dir, device="cpu"):
    """A MultiTaskModel from a folder written by train.py."""
    return load_trained(model_dir, MultiTaskModel, device)


# --- The tokenizer files ----------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece_from_vocab(path):
    """The lower-casing BERT WordPiece tokenizer, built from a vocab.txt (one piece per line)."""
    vocab = {}
    lines = io.StringIO(read_text(path), newline=None)  # universal newlines, as open() reads it
    for index, line in enumerate(lines):
        vocab[line.rstrip("\n")] = index  # a repeated line keeps its last index, as in BertTokenizer
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{path}: lacks the special tokens {', '.join(missing)}")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents=None means "follow lowercase", so accents are stripped, as in uncased BERT.
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Special tokens written in the text ("[MASK]") map to their ids, unsplit.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


ROBERTA_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def byte_level_bpe_from_files(vocab_path, merges_path):
    """RoBERTa's tokenizer, built from vocab.json + merges.txt (Radford et al., 2019: byte-level BPE).

    Every byte of the UTF-8 text maps to a printable character ("Ġ" is the
    space), so there is no unknown token; a word that follows a space is a
    different token from the same word at the start ("Ġcat" vs "cat"). The
    template is <s> A </s>, and <s> A </s></s> B </s> for a pair.
    """
    try:
        vocab = json.loads(read_text(vocab_path))
    except json.JSONDecodeError as e:
        raise DataError(f"{vocab_path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict):
        raise DataError(f"{vocab_path}: expected a JSON object of token -> id")
    missing = [t for t in ROBERTA_SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{vocab_path}: lacks the special tokens {', '.join(missing)}")
    merges = [tuple(line.split(" ")) for line in read_text(merges_path).splitlines()
              if line and not line.startswith("#version")]
    bad = next((n for n, m in enumerate(merges, start=1) if len(m) != 2), None)
    if bad is not None:
        raise DataError(f"{merges_path}:{bad}: expected two tokens separated by one space")
    tokenizer = Tokenizer(BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(ROBERTA_SPECIAL_TOKENS))
    return tokenizer


def read_tokenizer(model_dir):
    """The tokenizer of a model folder: tokenizer.json if present, else vocab.txt (BERT's WordPiece),
    else vocab.json + merges.txt (RoBERTa's byte-level BPE). data.load_tokenizer sets it up for use."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"{model_dir}: model folder not found; run `python download.py` first")
    if (model_dir / "tokenizer.json").exists():
        path = model_dir / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise DataError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
    elif (model_dir / "vocab.txt").exists():
        tokenizer = wordpiece_from_vocab(model_dir / "vocab.txt")
    elif (model_dir / "vocab.json").exists() and (model_dir / "merges.txt").exists():
        tokenizer = byte_level_bpe_from_files(model_dir / "vocab.json", model_dir / "merges.txt")
    else:
        empty = not any(model_dir.iterdir())
        raise DataError(f"{model_dir}: has neither tokenizer.json nor vocab.txt (nor vocab.json + merges.txt)"
                        + (run_hint(model_dir, "tokenizer") or ("; the folder is empty" if empty else "")
                           + DOWNLOAD_HINT))
    return tokenizer


def byte_level(tokenizer):
    """Does the tokenizer pre-tokenize bytes (RoBERTa), where a leading space is part of a token?"""
    step = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = step.get("pretokenizers", [step]) if step.get("type") == "Sequence" else [step]
    return any(s.get("type") == "ByteLevel" for s in steps)


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")  # what load_tokenizer reads, and what tells transformers how


def copy_tokenizer(model_dir, out_dir, max_len=None):
    """Copy the tokenizer files of a model folder to out_dir (a run folder), so that out_dir is a
    complete model folder: load_tokenizer, predict.py and embed.py read it as they read model_dir.
    max_len: the word pieces the run kept, written as tokenizer_config.json's model_max_length, where
    transformers' tokenizers (and CrossEncoder with them) cut a text as the run did."""
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).exists():
            atomic_write(Path(out_dir) / name, lambda tmp: shutil.copyfile(Path(model_dir) / name, tmp))
    if max_len is not None:
        path = Path(out_dir) / "tokenizer_config.json"
        settings = json.loads(read_text(path)) if path.exists() else {}
        if not isinstance(settings, dict):
            raise DataError(f"{Path(model_dir) / path.name}: expected a JSON object")
        settings["model_max_length"] = max_len
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))


def pooling_note(config, pool):
    """The one line a tool prints when --pool cls meets a checkpoint without a pooler, else None."""
    if pool == "cls" and not config.has_pooler:
        return (f"--pool cls: this {config.model_type} checkpoint has no pooler weights, so cls pooling reads the "
                "first token's final state as it is (no dense + tanh)")
    return None


def check_fits(tokenizer, config, max_len, model_dir):
    """The tokenizer's ids and max_len must fit the model's embedding tables."""
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise DataError(f"{model_dir}: the tokenizer has {tokenizer.get_vocab_size()} entries, "
                        f"more than vocab_size {config.vocab_size} in config.json")
    if max_len > config.max_len:
        raise DataError(f"argument --max-len: {max_len} is more than the model's "
                        f"max_position_embeddings ({config.max_position_embeddings})"
                        + (f" less the {config.position_start} position ids {config.model_type} skips"
                           if config.position_start else ""))
