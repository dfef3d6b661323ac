"""Learning rates (Task 4): layer-wise rates, weight-decay rules, and the schedule.

Layer-wise learning-rate decay (Howard & Ruder, 2018; Sun et al., 2019, "How
to Fine-Tune BERT for Text Classification"): the top encoder layer gets --lr,
each layer below it --lr-decay times the rate of the layer above, and the
embeddings one step lower still. Lower layers hold general features that
pre-training got right, so they move least; the freshly initialized heads
start from nothing and get the highest rate, --head-lr, or a rate per task
with --task-lr (--cls-lr and --ner-lr: per level).

Biases and LayerNorm parameters get no weight decay: decay pulls weights
towards zero, which means nothing for a shift or a scale of 1.

Groups are built from trainable parameters only, so freezing (freeze.py)
decides what is in the optimizer and this file decides how fast it moves.

train.py's default rates follow the backbone's size (auto_top_rate, auto_decay; the study
behind them is docs/defaults.md): the top rate scales with 1 / hidden size squared, and the
decay per layer leaves the embeddings the same share of the top rate at any depth.
"""

import torch
from torch import nn

from model import parameter_part

AUTO = "auto"
BERT_BASE_WIDTH, BERT_BASE_TOP_RATE = 768, 5e-5  # the top of Devlin et al.'s (2019) range
# The most auto gives a narrow model: ELECTRA-small's rate, the largest Turc et al. (2019) searched.
NARROW_TOP_RATE = 3e-4
# The embeddings' rate / the top rate: 0.53, near Sun et al.'s 0.95 ** 12 = 0.54 (bert-base).
EMBEDDINGS_SHARE = 0.9 ** 6


def auto_top_rate(hidden_size):
    """--lr auto: 5e-5 for bert-base (hidden 768), 2e-4 for a 384-wide model, at most 3e-4.

    The rule goes through two points: bert-base's rate from the literature, and the rate
    measured for all-MiniLM-L6-v2 (docs/defaults.md). Below 384 it is an extrapolation, so it
    stops at NARROW_TOP_RATE.
    """
    return min(BERT_BASE_TOP_RATE * (BERT_BASE_WIDTH / hidden_size) ** 2, NARROW_TOP_RATE)


def auto_decay(num_layers):
    """--lr-decay auto: EMBEDDINGS_SHARE ** (1 / layers), 0.9 for 6 layers, 0.949 for 12."""
    return EMBEDDINGS_SHARE ** (1 / num_layers)


def part_rates(num_layers, lr, lr_decay, head_rates):
    """The base learning rate of every part of the model, bottom to top: the embeddings, each layer,
    the pooler, then the heads in the order of head_rates ({head part: its rate})."""
    rates = {"embeddings": lr * lr_decay ** num_layers}
    rates |= {f"layer.{i}": lr * lr_decay ** (num_layers - 1 - i) for i in range(num_layers)}
    rates["pooler"] = lr  # it sits on the top layer
    return rates | head_rates


def param_groups(model, rates, weight_decay, names=None):
    """Optimizer groups for the trainable parameters (only those in `names`, if given).

    One group per (part, decay or not), in the order of `rates` (part_rates:
    bottom to top). Each group carries its "name" and its "base_lr"; the
    training loop sets "lr" = base_lr x schedule factor.
    """
    no_decay = {f"{module_name}.{p}" if module_name else p
                for module_name, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                for p, _ in module.named_parameters(recurse=False)}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or (names is not None and name not in names):
            continue
        part = parameter_part(name)
        decays = not (name.endswith(".bias") or name in no_decay)
        group = groups.setdefault((part, decays), {
            "name": part if decays else f"{part} (no decay)", "params": [], "base_lr": rates[part],
            "lr": rates[part], "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
    order = list(rates)
    return [groups[key] for key in sorted(groups, key=lambda k: (order.index(k[0]), not k[1]))]


def adamw(groups, device):
    """AdamW over the groups, by torch's fused kernel: one pass over each tensor and its state,
    the per-operation update's scores to the fourth digit (docs/defaults.md). With nothing to
    train (--freeze all), over one empty group, as AdamW needs at least one."""
    empty = [{"params": [], "name": "none", "base_lr": 0.0}]
    return torch.optim.AdamW(groups or empty, fused=device.type in ("cpu", "cuda"))


def lr_factor(step, total_steps, warmup_steps):
    """Linear warmup to 1 over warmup_steps, then linear decay towards 0 at total_steps.

    step counts from 0; the first step already has a non-zero rate, and the
    last one (total_steps - 1) has 1 / (total_steps - warmup_steps).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def format_groups(groups):
    """The table printed at start: group, parameter count, learning rate, weight decay."""
    lines = [f"  {'group':<24} {'parameters':>12} {'lr':>9} {'decay':>6}"]
    for g in groups:
        count = sum(p.numel() for p in g["params"])
        lines.append(f"  {g['name']:<24} {count:>12,} {g['base_lr']:>9.2e} {g['weight_decay']:>6}")
    return "\n".join(lines)
