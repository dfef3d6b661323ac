"""Which parameters train (Task 3): freezing strategies, and gradual unfreezing epoch by epoch.

A frozen parameter has requires_grad = False: it gets no gradient, the optimizer never holds
it (lr.py builds groups from trainable parameters only), and it stays bit-identical.
Strategies name parts of the model (model.parameter_part): the encoder's embeddings, layer.{i}
and pooler, and the model's heads, one per task ("ag_head", "ner_head"; "project", the
sentence projection that the sentence-level heads share).

  none        everything trains
  all         nothing trains: the run only evaluates
  backbone    the whole encoder (embeddings, every layer, pooler): the heads
              train on fixed features
  embeddings  the embedding tables and their LayerNorm
  lower:N     the embeddings and the N lowest layers (selective freezing)
  NAME-head   a task's head by the task's name: "ner-head" (train.py's
              "cls-head": every sentence-level head)

Strategies combine with commas: "embeddings,ner-head". Gradual unfreezing
(Howard & Ruder, 2018, ULMFiT) starts with the backbone frozen and releases
one layer per epoch from the top down, the embeddings last. A backbone frozen
for the whole run is a fixed function: support/features.py computes its outputs once.

Reading order: parse_freeze, gradual_frozen -> Plan, the run's schedule ->
apply_freeze / release -> what a step asks (set_train_mode, task_trains).
"""

from dataclasses import dataclass

from lr import param_groups
from model import parameter_part

STRATEGIES = ("none", "all", "backbone", "embeddings", "lower:N")  # and one "<task>-head" per head


def backbone_parts(num_layers, pooler=True):
    """The encoder's parts; pooler=False for a checkpoint without one (BertConfig.has_pooler)."""
    return {"embeddings", *(["pooler"] if pooler else []),
            *(f"layer.{i}" for i in range(num_layers))}


def parse_freeze(spec, num_layers, heads):
    """"backbone,ner-head" -> the set of frozen parts; heads: the model's head parts ("ag_head",
    "ner_head"), which "all" includes and "ner-head" names. ValueError names a bad item."""
    frozen = set()
    for item in spec.split(","):
        item = item.strip()
        if item == "none":
            continue
        if item == "all":
            frozen |= backbone_parts(num_layers) | set(heads)
        elif item == "backbone":
            frozen |= backbone_parts(num_layers)
        elif item == "embeddings":
            frozen.add("embeddings")
        elif item.replace("-", "_") in heads:
            frozen.add(item.replace("-", "_"))
        elif item.startswith("lower:"):
            n = item.removeprefix("lower:")
            if not n.isdigit() or not 1 <= int(n) <= num_layers:
                raise ValueError(f"{item!r}: N must be a whole number from 1 to {num_layers}, "
                                 f"the model's layer count")
            frozen |= {"embeddings", *(f"layer.{i}" for i in range(int(n)))}
        else:
            choices = ", ".join([*STRATEGIES, *(head.replace("_", "-") for head in heads)])
            raise ValueError(f"unknown strategy {item!r}; choose from {choices}, joined by commas")
    return frozen


def gradual_frozen(epoch, num_layers, base):
    """Frozen parts in `epoch` under gradual unfreezing, on top of the always-frozen `base`.
    Epoch 0 trains only the heads; epoch 1 adds the top layer (with the pooler that sits on it),
    epoch 2 the layer below, ..., and the epoch after layer 0 the embeddings."""
    release_order = [{"pooler", f"layer.{num_layers - 1}"}]
    release_order += [{f"layer.{i}"} for i in range(num_layers - 2, -1, -1)] + [{"embeddings"}]
    frozen = backbone_parts(num_layers)
    for parts in release_order[:epoch]:
        frozen -= parts
    return frozen | base


@dataclass
class Plan:
    """--freeze and --unfreeze as a schedule: the frozen parts of every epoch."""
    base: set  # frozen throughout (--freeze)
    num_layers: int
    heads: tuple  # the model's parts beyond the backbone (a bi-encoder may have none)
    gradual: bool = False  # --unfreeze gradual
    pooler: bool = True  # does the model have a pooler?

    @classmethod
    def from_flags(cls, freeze, unfreeze, num_layers, heads, pooler=True):
        return cls(parse_freeze(freeze, num_layers, heads), num_layers, tuple(heads),
                   unfreeze == "gradual", pooler)

    def frozen_at(self, epoch):
        return gradual_frozen(epoch, self.num_layers, self.base) if self.gradual else self.base

    def trains(self, epochs):
        """Does anything train in the first `epochs` epochs?"""
        every_part = backbone_parts(self.num_layers, self.pooler) | set(self.heads)
        return any(not every_part <= self.frozen_at(epoch) for epoch in range(epochs))

    def backbone_fixed(self):
        """Is the backbone frozen for the whole run? Then features.py computes its outputs once."""
        return not self.gradual and backbone_parts(self.num_layers, self.pooler) <= self.base


def apply_freeze(model, frozen):
    """Set requires_grad from the frozen parts; returns the names of those it made trainable."""
    released = []
    for name, p in model.named_parameters():
        trains = parameter_part(name) not in frozen
        if trains and not p.requires_grad:
            released.append(name)
        p.requires_grad_(trains)
    return released


def release(model, optimizer, frozen, rates, weight_decay):
    """Gradual unfreezing's step: unfreeze down to `frozen`, and give the released parameters their
    optimizer groups (lr.py). Returns their names. Under torchrun, wrap the model in DDP again
    afterwards: DDP fixes the parameters it synchronizes when it is built (distributed.wrap)."""
    released = apply_freeze(model, frozen)
    for group in param_groups(model, rates, weight_decay, names=set(released)):
        optimizer.add_param_group(group)
    return released


def set_train_mode(model, frozen):
    """Train mode, but a fully frozen backbone runs in eval mode (no dropout): a fixed function."""
    model.train()
    if backbone_parts(model.bert.config.num_hidden_layers, model.bert.pooler is not None) <= frozen:
        model.bert.eval()


def task_trains(model, task):
    """Does a step of this task update anything? Not when all of its path is frozen: the encoder's
    parts it reads, and its head (model.unread_parts says which parts a task never reads)."""
    unread = model.unread_parts(task)
    return any(p.requires_grad for n, p in model.named_parameters()
               if parameter_part(n) not in unread)


def trainable_summary(model):
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
