"""sentence-transformers' folder layout, written into a run folder and read from a model folder.

A folder that sentence-transformers saved holds a modules.json: the steps
from text to a sentence vector, each with a folder of its own settings.
The steps this encoder has are (Reimers & Gurevych, 2019):

    Transformer   the BERT in the folder itself (config.json, model.safetensors)
    Pooling       mean, max, or cls: the first token's final state, as it is
    Dense         a linear layer: with tanh on the first token, BERT's pooler
                  (our --pool cls); with no activation, our --embed-dim projection
    Normalize     divide by the L2 norm (our --normalize l2)

write_modules gives train.py runs and pairs.py bi-encoders these files (in
the layout every sentence-transformers version reads), so that
SentenceTransformer(run) computes the run's own sentence vector.
--normalize l1 has no module there; such a run gets no modules.json at all
(l1_note says so), since a partial one would load as a different vector.
read_modules reads a folder's modules.json into a SentenceModules: what
embed.py, pairs.py and train.py take as their defaults. Any other module or
pooling mode is refused in one line: never dropped without a word.

Reading order: the module names -> write_modules -> read_modules and its
helpers -> SentenceModules.encoder, the SentenceEncoder it describes.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import SentenceEncoder
from support.runtime import CheckpointError, atomic_write

# What modules.json calls each module: the classic names, and those of sentence-transformers 6.
TYPES = {"Transformer": ("sentence_transformers.models.Transformer",
                         "sentence_transformers.base.modules.transformer.Transformer"),
         "Pooling": ("sentence_transformers.models.Pooling",
                     "sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
         "Dense": ("sentence_transformers.models.Dense", "sentence_transformers.base.modules.dense.Dense"),
         "Normalize": ("sentence_transformers.models.Normalize",
                       "sentence_transformers.base.modules.normalize.Normalize")}
TANH, IDENTITY = "torch.nn.modules.activation.Tanh", "torch.nn.modules.linear.Identity"
POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
OTHER_POOLING = ("mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")  # modes this encoder lacks


def l1_note(out_dir):
    """The line a run with --normalize l1 prints: why its folder has no modules.json."""
    return (f"note: --normalize l1 has no sentence-transformers module, so {out_dir} gets no modules.json; "
            "SentenceTransformer would load it as a plain BERT, with mean pooling: use embed.py for its vectors")


# --- Writing ----------------------------------------------------------------------------

def write_modules(out_dir, encoder, max_len):
    """modules.json and its module folders for encoder (a SentenceEncoder), whose model.safetensors and
    config.json save_trained writes; max_len: the word pieces a sentence keeps. Nothing for --normalize l1."""
    if encoder.norm == "l1":
        return
    out_dir, hidden = Path(out_dir), encoder.bert.config.hidden_size
    modules = [("", "Transformer")]
    _write_json(out_dir / "sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False})
    modes = {key: encoder.pool == pool for pool, key in POOLING_KEYS.items()}
    _write_json(out_dir / "1_Pooling" / "config.json", {"word_embedding_dimension": hidden, **modes,
                                                         "pooling_mode_mean_sqrt_len_tokens": False})
    modules.append(("1_Pooling", "Pooling"))
    dense = [(encoder.bert.pooler, TANH)] if encoder.pool == "cls" and encoder.bert.pooler is not None else []
    dense += [(encoder.project, IDENTITY)] if encoder.project is not None else []
    for linear, activation in dense:
        folder = out_dir / f"{len(modules)}_Dense"
        folder.mkdir(exist_ok=True)
        tensors = {"linear.weight": linear.weight.detach().to("cpu", torch.float32).contiguous(),
                   "linear.bias": linear.bias.detach().to("cpu", torch.float32).contiguous()}
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        _write_json(folder / "config.json", {"in_features": linear.in_features, "out_features": linear.out_features,
                                             "bias": True, "activation_function": activation})
        modules.append((folder.name, "Dense"))
    if encoder.norm == "l2":
        modules.append((f"{len(modules)}_Normalize", "Normalize"))  # no settings, and no folder needed
    _write_json(out_dir / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": TYPES[kind][0]}
                                           for i, (path, kind) in enumerate(modules)])


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


# --- Reading ----------------------------------------------------------------------------

@dataclass
class SentenceModules:
    """What a folder's modules.json computes, in this encoder's terms."""
    pool: str  # mean, max or cls
    pooler: object  # for cls: (weight, bias) of a tanh Dense (BERT's pooler), or None: the first token as it is
    project: object  # (weight, bias) of the projection, or None
    normalize: str  # "l2" or "none"
    path: Path  # the modules.json read

    @property
    def embed_dim(self):
        return None if self.project is None else self.project[0].shape[0]

    def describe(self):
        cls = "cls (with the pooler)" if self.pooler is not None else "cls (the first token, no pooler)"
        parts = [f"pooling {cls if self.pool == 'cls' else self.pool}"]
        parts += [f"projection to {self.embed_dim}"] if self.project is not None else []
        return ", ".join(parts + ([f"normalize {self.normalize}"] if self.normalize != "none" else []))

    def encoder(self, bert):
        """The SentenceEncoder these modules describe, on bert (whose pooler it may set or remove)."""
        if self.pool == "cls":  # the pooler: the tanh Dense's weights, or none (the first token as it is)
            bert.pooler = None if self.pooler is None else torch.nn.Linear(*self.pooler[0].shape[::-1])
            bert.config = replace(bert.config, has_pooler=self.pooler is not None)
            if self.pooler is not None:
                _copy(bert.pooler, self.pooler)
        encoder = SentenceEncoder(bert, self.pool, self.embed_dim, self.normalize)
        if self.project is not None:
            _copy(encoder.project, self.project)
        return encoder


def start_from(encoder, modules):
    """Give a new bi-encoder's SentenceEncoder the weights of a folder's modules that fit it: the tanh Dense
    as the pooler (both pool cls), the projection (the same size). Returns the line that says what
    was taken, or None."""
    taken, left = [], ""
    if encoder.pool == modules.pool == "cls" and modules.pooler is not None:
        _copy(encoder.bert.pooler, modules.pooler)
        taken.append("its pooler (the Dense + tanh)")
    if encoder.project is not None and encoder.embed_dim == modules.embed_dim:
        _copy(encoder.project, modules.project)
        taken.append(f"its projection to {encoder.embed_dim}")
    elif modules.project is not None:
        left = f"; not from its projection to {modules.embed_dim}: the run's projection starts random"
    if not (taken or left):
        return None
    return f"{modules.path}: the bi-encoder starts from {' and '.join(taken) or 'nothing of it'}{left}"


def _copy(linear, weights):
    with torch.no_grad():
        linear.weight.copy_(weights[0])
        linear.bias.copy_(weights[1])


def read_modules(model_dir, hidden_size):
    """The SentenceModules of model_dir's modules.json, or None where there is none. A module or a
    setting this encoder lacks is a CheckpointError naming the file."""
    model_dir = Path(model_dir)
    path = model_dir / "modules.json"
    if not path.exists():
        return None
    entries = _read_json(path)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CheckpointError(f"{path}: expected a JSON list of modules")
    kinds = []
    for n, entry in enumerate(entries):
        kind = next((k for k, names in TYPES.items() if entry.get("type") in names), None)
        if kind is None:
            raise CheckpointError(f"{path}: module {n} ({entry.get('type')}) is not one this encoder has "
                                  f"({', '.join(TYPES)}); use sentence-transformers itself for this model")
        kinds.append((kind, model_dir / str(entry.get("path", ""))))
    if not kinds or kinds[0][0] != "Transformer" or [k for k, _ in kinds].count("Transformer") > 1:
        raise CheckpointError(f"{path}: expected one Transformer module, first")
    if kinds[0][1] != model_dir:
        raise CheckpointError(f"{path}: the Transformer module is in {kinds[0][1]}, not in the folder itself; "
                              f"give --model {kinds[0][1]}")
    if len(kinds) < 2 or kinds[1][0] != "Pooling":
        raise CheckpointError(f"{path}: expected a Pooling module after the Transformer; this encoder has no "
                              "token-level output")
    pool = _pooling(kinds[1][1] / "config.json")
    dense, normalize = [], "none"
    for n, (kind, folder) in enumerate(kinds[2:], start=2):
        if normalize != "none":
            raise CheckpointError(f"{path}: module {n} ({kind}) comes after Normalize; this encoder normalizes last")
        if kind == "Normalize":
            normalize = "l2"
        elif kind == "Dense":
            dense.append((n, *_dense(folder, path, n)))
        else:
            raise CheckpointError(f"{path}: module {n} is a second {kind}; this encoder has one")
    pooler = None
    if pool == "cls" and dense and dense[0][1] == TANH:  # BERT's pooler: dense + tanh on the first token
        n, _, weights = dense.pop(0)
        if tuple(weights[0].shape) != (hidden_size, hidden_size):
            raise CheckpointError(f"{path}: module {n} (Dense + tanh) is {tuple(weights[0].shape)}; as the pooler "
                                  f"it would be ({hidden_size}, {hidden_size})")
        pooler = weights
    for n, activation, _ in dense:
        if activation != IDENTITY:
            raise CheckpointError(f"{path}: module {n} is a Dense layer with {activation}; this encoder's "
                                  "projection is linear (and tanh only as the pooler, right after cls pooling)")
    if len(dense) > 1:
        raise CheckpointError(f"{path}: modules {dense[0][0]} and {dense[1][0]} are two Dense layers; this "
                              "encoder has one projection")
    project = dense[0][2] if dense else None
    if project is not None and project[0].shape[1] != hidden_size:
        raise CheckpointError(f"{path}: module {dense[0][0]} (Dense) takes {project[0].shape[1]} features; the "
                              f"encoder gives {hidden_size}")
    return SentenceModules(pool, pooler, project, normalize, path)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (modules.json names its folder)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def _pooling(path):
    """mean, max or cls, from a Pooling config.json (the classic boolean keys, or pooling_mode)."""
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "pooling_mode" in config:  # sentence-transformers 6
        modes = str(config["pooling_mode"]).split("+") if config["pooling_mode"] else []
        modes = ["cls" if m == "cls_token" else m.removesuffix("_tokens") for m in modes]
    else:
        modes = [pool for pool, key in POOLING_KEYS.items() if config.get(key)]
        modes += [m for m in OTHER_POOLING if config.get(f"pooling_mode_{m}")]
    if len(modes) != 1 or modes[0] not in POOLING_KEYS:
        raise CheckpointError(f"{path}: pooling {' + '.join(modes) or 'none'} is not one this encoder has "
                              f"({', '.join(POOLING_KEYS)}, one at a time)")
    return modes[0]


def _dense(folder, modules_path, n):
    """(activation, (weight, bias)) of a Dense module's folder."""
    config = _read_json(folder / "config.json")
    weights_path = folder / "model.safetensors"
    if not weights_path.exists():
        pickled = " (its pytorch_model.bin is a pickle, which this project never loads)" \
            if (folder / "pytorch_model.bin").exists() else ""
        raise CheckpointError(f"{weights_path}: not found{pickled}; save the model again with a "
                              "sentence-transformers version that writes safetensors")
    try:
        tensors = load_file(weights_path)
        weight = tensors["linear.weight"].float()
        bias = tensors["linear.bias"].float() if config.get("bias", True) else torch.zeros(weight.shape[0])
    except (SafetensorError, OSError, KeyError) as e:
        raise CheckpointError(f"{weights_path}: not a Dense module's weights ({e})") from None
    return config.get("activation_function", IDENTITY), (weight, bias)
