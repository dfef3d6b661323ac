"""Which parameters train (Task 3): freezing strategies and gradual unfreezing.

A frozen parameter has requires_grad = False: it gets no gradient, the
optimizer never holds it (lr.py builds groups from trainable parameters
only), and it stays bit-identical. Strategies name parts of the model (see
model.parameter_part):

  none        everything trains
  all         nothing trains: the run only evaluates
  backbone    the whole encoder (embeddings, every layer, pooler): the heads
              train on fixed features
  embeddings  the embedding tables and their LayerNorm
  lower:N     the embeddings and the N lowest layers (selective freezing)
  cls-head    the classification head (and the sentence projection)
  ner-head    the NER head

Strategies combine with commas: "embeddings,ner-head". Gradual unfreezing
(Howard & Ruder, 2018, ULMFiT) starts with the backbone frozen and releases
one layer per epoch from the top down, the embeddings last.
"""

from model import parameter_part

STRATEGIES = ("none", "all", "backbone", "embeddings", "lower:N", "cls-head", "ner-head")


def backbone_parts(num_layers):
    return {"embeddings", "pooler", *(f"layer.{i}" for i in range(num_layers))}


def parse_freeze(spec, num_layers):
    """"backbone,ner-head" -> the set of frozen parts; ValueError names a bad item."""
    frozen = set()
    for item in spec.split(","):
        item = item.strip()
        if item == "none":
            continue
        if item == "all":
            frozen |= backbone_parts(num_layers) | {"cls_head", "ner_head"}
        elif item == "backbone":
            frozen |= backbone_parts(num_layers)
        elif item == "embeddings":
            frozen.add("embeddings")
        elif item in ("cls-head", "ner-head"):
            frozen.add(item.replace("-", "_"))
        elif item.startswith("lower:"):
            n = item.removeprefix("lower:")
            if not n.isdigit() or not 1 <= int(n) <= num_layers:
                raise ValueError(f"{item!r}: N must be a whole number from 1 to {num_layers}, the model's layer count")
            frozen |= {"embeddings", *(f"layer.{i}" for i in range(int(n)))}
        else:
            raise ValueError(f"unknown strategy {item!r}; choose from {', '.join(STRATEGIES)}, joined by commas")
    return frozen


def gradual_frozen(epoch, num_layers, base):
    """Frozen parts in `epoch` under gradual unfreezing, on top of the always-frozen `base`.

    Epoch 0 trains only the heads; epoch 1 adds the top layer (with the
    pooler that sits on it), epoch 2 the layer below, ..., and the epoch
    after layer 0 the embeddings.
    """
    release_order = [{"pooler", f"layer.{num_layers - 1}"}]
    release_order += [{f"layer.{i}"} for i in range(num_layers - 2, -1, -1)] + [{"embeddings"}]
    frozen = backbone_parts(num_layers)
    for parts in release_order[:epoch]:
        frozen -= parts
    return frozen | base


def apply_freeze(model, frozen):
    """Set requires_grad from the frozen parts; returns the names of parameters that changed to trainable."""
    released = []
    for name, p in model.named_parameters():
        trains = parameter_part(name) not in frozen
        if trains and not p.requires_grad:
            released.append(name)
        p.requires_grad_(trains)
    return released


def set_train_mode(model, frozen, num_layers):
    """Train mode, except that a fully frozen backbone runs in eval mode (no dropout): a fixed feature extractor."""
    model.train()
    if backbone_parts(num_layers) <= frozen:
        model.bert.eval()


def describe(model):
    """One line per part: trainable or frozen, with parameter counts."""
    counts = {}
    for name, p in model.named_parameters():
        part = parameter_part(name)
        trainable, total = counts.get(part, (0, 0))
        counts[part] = (trainable + (p.numel() if p.requires_grad else 0), total + p.numel())
    lines = []
    for part, (trainable, total) in counts.items():
        state = "trains" if trainable == total else "frozen" if trainable == 0 else "partly frozen"
        lines.append(f"  {part:<12} {total:>12,}  {state}")
    n_train = sum(t for t, _ in counts.values())
    n_total = sum(t for _, t in counts.values())
    lines.append(f"  {'trainable':<12} {n_train:>12,}  of {n_total:,} ({n_train / n_total:.1%})")
    return "\n".join(lines)
