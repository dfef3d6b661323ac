"""Which parameters train (Task 3): freezing strategies, gradual unfreezing, and what a training step calls.

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

Reading order: the strategies (parse_freeze, gradual_frozen) -> Plan, the
run's schedule -> apply_freeze / release (requires_grad, and the optimizer
groups of released parameters) -> Runner, what a training step calls (the
model, or its heads on a frozen backbone's stored features, features.py;
wrapped in DDP under torchrun, rebuilt after a release).
"""

from dataclasses import dataclass

import torch

import distributed
from lr import param_groups
from model import parameter_part

STRATEGIES = ("none", "all", "backbone", "embeddings", "lower:N", "cls-head", "ner-head")
TASK_HEADS = {"ag": "cls_head", "ner": "ner_head"}


def backbone_parts(num_layers, pooler=True):
    """The encoder's parts; pooler=False for a checkpoint without one (the hub's RoBERTa and DistilBERT)."""
    return {"embeddings", *(["pooler"] if pooler else []), *(f"layer.{i}" for i in range(num_layers))}


def parse_freeze(spec, num_layers):
    """"backbone,ner-head" -> the set of frozen parts; ValueError names a bad item."""
    frozen = set()
    for item in spec.split(","):
        item = item.strip()
        if item == "none":
            continue
        if item == "all":
            frozen |= backbone_parts(num_layers) | set(TASK_HEADS.values())
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


@dataclass
class Plan:
    """--freeze and --unfreeze as a schedule: the frozen parts of every epoch."""
    base: set  # frozen throughout (--freeze)
    num_layers: int
    gradual: bool = False  # --unfreeze gradual
    pooler: bool = True  # does the model have a pooler?
    heads: tuple = tuple(TASK_HEADS.values())  # the model's parts beyond the backbone (a bi-encoder may have none)

    @classmethod
    def from_flags(cls, freeze, unfreeze, num_layers, pooler=True, heads=tuple(TASK_HEADS.values())):
        return cls(parse_freeze(freeze, num_layers), num_layers, unfreeze == "gradual", pooler, heads)

    def frozen_at(self, epoch):
        return gradual_frozen(epoch, self.num_layers, self.base) if self.gradual else self.base

    def trains(self, epochs):
        """Does anything train in the first `epochs` epochs?"""
        every_part = backbone_parts(self.num_layers, self.pooler) | set(self.heads)
        return any(not every_part <= self.frozen_at(epoch) for epoch in range(epochs))

    def backbone_fixed(self):
        """Is the whole backbone frozen for the whole run? Then its outputs can be computed once (features.py)."""
        return not self.gradual and backbone_parts(self.num_layers, self.pooler) <= self.base


def apply_freeze(model, frozen):
    """Set requires_grad from the frozen parts; returns the names of parameters that changed to trainable."""
    released = []
    for name, p in model.named_parameters():
        trains = parameter_part(name) not in frozen
        if trains and not p.requires_grad:
            released.append(name)
        p.requires_grad_(trains)
    return released


def release(model, optimizer, frozen, rates, weight_decay):
    """Gradual unfreezing's step: unfreeze down to `frozen`, and give the released parameters their
    optimizer groups (lr.py's rates). Returns their names. A Runner must rebuild() after this."""
    released = apply_freeze(model, frozen)
    for group in param_groups(model, rates, weight_decay, names=set(released)):
        optimizer.add_param_group(group)
    return released


def set_train_mode(model, frozen, num_layers):
    """Train mode, except that a fully frozen backbone runs in eval mode (no dropout): a fixed feature extractor."""
    model.train()
    if backbone_parts(num_layers, model.bert.pooler is not None) <= frozen:
        model.bert.eval()


def task_trains(model, task):
    """Does a step of this task update anything? Not when all of its path is frozen.

    The path: embeddings, layers, the task's head, and the pooler only for
    classification with pool "cls" (no other step reads it).
    """
    skip = {"cls_head", "ner_head", "pooler"} - {TASK_HEADS[task]}
    if task == "ag" and model.encoder.pool == "cls":
        skip -= {"pooler"}
    return any(p.requires_grad for n, p in model.named_parameters() if parameter_part(n) not in skip)


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


# --- What a training step calls ------------------------------------------------------

class _Heads(torch.nn.Module):
    """The heads alone, fed from stored features: a module of its own, so that DDP can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features, task):
        return self.model.head(features, task)


class Runner:
    """What a training step calls, given what is frozen: logits for a batch.

    Without stored features it is the model; with them ({task: features.Features}
    of the training split), the heads alone. Under torchrun the module is wrapped in DDP
    (distributed.wrap); a step of a task whose whole path is frozen calls the
    unwrapped module, because DDP would wait for gradients that never come.
    DDP fixes its parameters when built, so call rebuild() after release().
    """

    def __init__(self, model, place, features=None):
        self.model, self.place, self.features = model, place, features
        self.rebuild()

    def rebuild(self):
        self.plain = self.model if self.features is None else _Heads(self.model)
        self.wrapped = None  # free the old DDP and its gradient hooks before building the next
        self.wrapped = distributed.wrap(self.plain, self.place)
        self.trains = {task: task_trains(self.model, task) for task in TASK_HEADS}

    def __call__(self, task, batch, indices):
        module = self.wrapped if self.trains[task] else self.plain
        if self.features is None:
            return module(batch["input_ids"], batch["attention_mask"], task)
        return module(self.features[task].batch(indices, batch["input_ids"].shape[1]), task)
