"""Train the multi-task model (Task 2): AG News topics and CoNLL-2003 entities on one encoder.

    python train.py --pool max --freeze backbone
    python train.py --model DIR --data DIR --epochs 3 --amp bf16 --out runs/NAME
    python train.py --out runs/NAME --resume          # continue an interrupted run

main() reads top to bottom: set up, then for each epoch and batch: set the
learning rates, forward, loss, backward, clip, step, log; evaluate after each
epoch, keep the best model, and evaluate it on test at the end. What a run
writes to --out is listed in README.md.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import freeze
import lr as lr_schedule
from data import (
    AG_CLASSES,
    IGNORE_INDEX,
    NER_TAGS,
    DataError,
    MultiTaskSampler,
    check_fits,
    collate,
    load_splits,
    load_tokenizer,
    word_tags,
)
from metrics import accuracy, entity_counts, scores_from_counts
from model import NORMS, POOLS, CheckpointError, MultiTaskModel, load_multitask, load_pretrained, save_multitask


class UsageError(Exception):
    """A bad flag or input; main() prints it as one line and exits with status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune BERT on AG News and CoNLL-2003 at once.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data", help="data directory written by download.py")
    p.add_argument("--model", default="data/bert-base-uncased", help="pretrained BERT folder")
    p.add_argument("--out", default=None, help="output folder (default: runs/<date>-<time>)")
    g = p.add_argument_group("model")
    g.add_argument("--pool", choices=POOLS, default="mean", help="sentence pooling for the classification head")
    g.add_argument("--embed-dim", type=int, default=None, help="project the sentence embedding to this size")
    g.add_argument("--normalize", choices=NORMS, default="none", help="normalize the sentence embedding")
    g.add_argument("--head-dropout", type=float, default=0.1)
    g = p.add_argument_group("freezing (Task 3)")
    g.add_argument("--freeze", default="none",
                   help="none | all | backbone | embeddings | lower:N | cls-head | ner-head, or a comma list")
    g.add_argument("--unfreeze", choices=("none", "gradual"), default="none",
                   help="gradual: start with the backbone frozen, release one layer per epoch from the top")
    g = p.add_argument_group("learning rates (Task 4)")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate of the top encoder layer")
    g.add_argument("--lr-decay", type=float, default=0.9, help="each lower layer gets this times the one above")
    g.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of both heads")
    g.add_argument("--cls-lr", type=float, default=None, help="learning rate of the classification head")
    g.add_argument("--ner-lr", type=float, default=None, help="learning rate of the NER head")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warmup")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g = p.add_argument_group("run")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-len", type=int, default=128, help="word pieces per example, [CLS] and [SEP] included")
    g.add_argument("--group-window", type=int, default=50,
                   help="sort by length inside windows of this many batches to cut padding (0: off)")
    g.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                   help="auto: bf16 on GPUs that have it, else fp16; off (fp32) on the CPU")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder; batches are then padded to a multiple of 8 tokens, "
                        "so that only a few shapes are compiled")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="use at most N examples per task and split")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    g.add_argument("--no-data-cache", action="store_true", help="do not cache tokenized data in DATA/.cache")
    g.add_argument("--no-cache", action="store_true",
                   help="with the whole backbone frozen, run it on every step instead of caching its outputs")
    g.add_argument("--cache-limit-mb", type=int, default=4096,
                   help="largest frozen-backbone cache to keep on the training device; past it, no cache")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs, leaving a checkpoint to --resume (e.g. for job time limits)")
    return p.parse_args(argv)


def check_args(args):
    """Flag problems a parser cannot see; raises UsageError naming the flag."""
    for flag in ("lr", "head_lr", "cls_lr", "ner_lr", "weight_decay", "clip"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"argument --{flag.replace('_', '-')}: must be a number >= 0, got {value}")
    for flag, low in (("epochs", 1), ("batch_size", 1), ("max_len", 3), ("log_every", 1), ("limit", 1),
                      ("embed_dim", 1), ("stop_after", 1), ("group_window", 0), ("cache_limit_mb", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UsageError(f"argument --{flag.replace('_', '-')}: must be at least {low}, got {value}")
    if not 0 < args.lr_decay <= 1:
        raise UsageError(f"argument --lr-decay: must be in (0, 1], got {args.lr_decay}")
    if not 0 <= args.warmup < 1:
        raise UsageError(f"argument --warmup: must be a fraction in [0, 1), got {args.warmup}")
    if not 0 <= args.head_dropout < 1:
        raise UsageError(f"argument --head-dropout: must be in [0, 1), got {args.head_dropout}")
    if args.resume and args.out is None:
        raise UsageError("argument --resume: give --out, the folder of the run to continue")
    if not Path(args.data).is_dir():
        raise UsageError(f"argument --data: {args.data} is not a folder; run `python download.py` first")


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def pick_amp(amp, device):
    """The autocast dtype, or None for fp32."""
    if device.type == "cpu":
        if amp == "fp16":
            raise UsageError("argument --amp: fp16 needs a CUDA GPU (fp16 autocast with a GradScaler is the CUDA "
                             "path here); on the CPU use --amp bf16 or off")
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def task_loss(logits, labels, task):
    """Cross-entropy in fp32: mean over examples (ag) or over first word pieces (ner)."""
    if task == "ag":
        return F.cross_entropy(logits.float(), labels)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def optimizer_step(optimizer, scaler, clip):
    """Unscale, clip, step, update. Returns True if the step was skipped for inf/NaN gradients."""
    scaler.unscale_(optimizer)  # clipping must see the true gradients, not the scaled ones
    if clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips the step if any gradient is inf or NaN
    scaler.update()  # ... and then lowers the scale
    optimizer.zero_grad(set_to_none=True)
    return scaler.is_enabled() and scaler.get_scale() < scale


def to_device(batch, device):
    pin = device.type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if pin else v) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, ag, ner, device, amp_dtype, batch_size, pad_id, multiple=1):
    """AG accuracy and CoNLL entity scores on one split."""
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    predicted = []
    order = np.argsort(ag.lengths(), kind="stable")  # similar lengths together: less padding
    for start in range(0, len(ag), batch_size):
        batch = to_device(collate(ag, order[start:start + batch_size].tolist(), pad_id, multiple), device)
        with autocast:
            predicted += model(batch["input_ids"], batch["attention_mask"], "ag").argmax(-1).tolist()
    gold = [ag.labels[i] for i in order]
    tags = [None] * len(ner)
    order = np.argsort(ner.lengths(), kind="stable")
    for start in range(0, len(ner), batch_size):
        indices = order[start:start + batch_size].tolist()
        batch = to_device(collate(ner, indices, pad_id, multiple), device)
        with autocast:
            pieces = model(batch["input_ids"], batch["attention_mask"], "ner").argmax(-1).tolist()
        for row, i in enumerate(indices):
            tags[i] = word_tags(pieces[row], ner.first_piece[i])
    scores = scores_from_counts(entity_counts(ner.word_tags, tags))
    return {"ag_accuracy": accuracy(gold, predicted), "ner_f1": scores["f1"],
            "ner_precision": scores["precision"], "ner_recall": scores["recall"],
            "ner_per_type": scores["per_type"]}


# Flags that may change between a run and its --resume; every other flag must stay the same.
RESUME_MAY_CHANGE = {"out", "resume", "stop_after", "log_every", "no_data_cache", "no_cache", "cache_limit_mb",
                     "device", "compile"}


def save_checkpoint(path, model, optimizer, scaler, state):
    """Everything --resume needs, in one safetensors file written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, values in optim["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata = {"state": json.dumps(state), "param_groups": json.dumps(optim["param_groups"]),
                "scaler": json.dumps(scaler.state_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_checkpoint(path):
    """(metadata, tensors) of a checkpoint file; CheckpointError if it cannot be read."""
    try:
        with safe_open(path, "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None


def check_resume(path, saved_run, args):
    """--resume continues the same run: the flags that shape it must be unchanged."""
    changed = [f"--{k.replace('_', '-')} {saved_run.get(k)} -> {v}" for k, v in vars(args).items()
               if k not in RESUME_MAY_CHANGE and saved_run.get(k) != v]
    if changed:
        raise CheckpointError(f"{path}: --resume needs the flags of the saved run; changed: {'; '.join(changed)}")


def load_checkpoint(path, model, optimizer, scaler):
    """Restore what save_checkpoint wrote; returns the saved state dict."""
    metadata, tensors = read_checkpoint(path)
    try:
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    groups = json.loads(metadata["param_groups"])
    if [g["name"] for g in groups] != [g["name"] for g in optimizer.param_groups]:
        raise CheckpointError(f"{path}: its optimizer groups do not match this run's flags")
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scaler.load_state_dict(json.loads(metadata["scaler"]))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return json.loads(metadata["state"])


@torch.no_grad()
def build_feature_cache(model, train, device, amp_dtype, batch_size, pad_id, limit_mb, multiple=1):
    """Run the frozen backbone once over every training example and keep what the heads read:
    one pooled vector per AG example, the token states of each CoNLL sentence. None if over the limit."""
    hidden = model.bert.config.hidden_size
    dtype = amp_dtype or torch.float32  # kept in the AMP dtype: half the memory, and the heads cast to it anyway
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    item = torch.finfo(dtype).bits // 8
    need = (len(train["ag"]) + int(train["ner"].lengths().sum())) * hidden * item / 2**20
    if need > limit_mb:
        print(f"frozen-backbone cache: would need {need:,.0f} MB, over --cache-limit-mb {limit_mb}; not caching")
        return None
    model.eval()
    start = time.perf_counter()
    store = {}
    for task, part in train.items():
        store[task] = [None] * len(part)
        order = np.argsort(part.lengths(), kind="stable")
        for first in range(0, len(part), batch_size):
            indices = order[first:first + batch_size].tolist()
            batch = to_device(collate(part, indices, pad_id, multiple), device)
            with autocast:
                features = model.features(batch["input_ids"], batch["attention_mask"], task)
            for row, i in enumerate(indices):  # clone: a slice would keep the whole batch alive
                keep = features[row] if task == "ag" else features[row, :len(part.input_ids[i])]
                store[task][i] = keep.to(dtype).clone()
    print(f"frozen-backbone cache: {len(train['ag']) + len(train['ner']):,} examples, {need:,.0f} MB on {device}, "
          f"built in {time.perf_counter() - start:.1f} s; the steps now run only the heads")
    return store


def cached_features(store, task, indices, width):
    """Stack (ag) or zero-pad to width (ner) the cached features of a batch; padding is never read by the loss."""
    rows = [store[task][i] for i in indices]
    if task == "ag":
        return torch.stack(rows)  # (B, H)
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])  # (B, T, H)
    for r, x in enumerate(rows):
        out[r, :len(x)] = x
    return out


def drain_losses(interval, state):
    """Turn the interval's loss tensors into numbers and add them to the epoch's running sum.

    .tolist() waits for the GPU, so the loop calls this only when it logs or stops.
    """
    losses = {task: torch.stack(values).tolist() for task, values in interval.items() if values}
    state["loss_sum"] += sum(map(sum, losses.values()))
    state["loss_count"] += sum(map(len, losses.values()))
    for values in interval.values():
        values.clear()
    return losses


def current_rates(optimizer):
    """The learning rate now, of the top trained encoder group and of each head."""
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups if "no decay" not in g["name"]}
    encoder = [name for name in rates if name.startswith("layer.")]
    shown = [f"lr {rates[max(encoder, key=lambda n: int(n.split('.')[1]))]:.2e}"] if encoder else []
    shown += [f"{head} {rates[head]:.2e}" for head in ("cls_head", "ner_head") if head in rates]
    return " ".join(shown) or "lr -"


def write_json(path, data, lines=False):
    """Write JSON (or JSON lines) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    text = "".join(json.dumps(r) + "\n" for r in data) if lines else json.dumps(data, indent=2) + "\n"
    tmp.write_text(text)
    os.replace(tmp, path)


def limit_split(part, limit):
    """A fixed random subset of at most `limit` examples (the same whatever --seed is)."""
    if limit is None or len(part) <= limit:
        return part
    return part.subset(np.sort(np.random.default_rng(0).permutation(len(part))[:limit]).tolist())


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM set a flag instead of killing the run; the loop then saves a checkpoint and exits."""
    stop = {"signal": None}
    previous = {signum: signal.signal(signum, lambda received, _: stop.update(signal=received))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        check_args(args)
        device = pick_device(args.device)
        amp_dtype = pick_amp(args.amp, device)
        tokenizer = load_tokenizer(args.model)
        bert = load_pretrained(args.model)
        check_fits(tokenizer, bert.config, args.max_len, args.model)
        pad_multiple = 8 if args.compile else 1  # few batch shapes: few compilations
        widest = -(-args.max_len // pad_multiple) * pad_multiple
        if widest > bert.config.max_position_embeddings:
            raise UsageError(f"argument --compile: --max-len {args.max_len} pads up to {widest} tokens, more than "
                             f"the model's {bert.config.max_position_embeddings} positions")
        num_layers = bert.config.num_hidden_layers
        try:
            base_frozen = freeze.parse_freeze(args.freeze, num_layers)
        except ValueError as e:
            raise UsageError(f"argument --freeze: {e}") from None
        out = Path(args.out or time.strftime("runs/%Y%m%d-%H%M%S"))
        checkpoint_path = out / "checkpoint" / "checkpoint.safetensors"
        if args.resume:
            if not checkpoint_path.exists():
                raise UsageError(f"argument --resume: {checkpoint_path} not found")
            saved, _ = read_checkpoint(checkpoint_path)
            saved = json.loads(saved["state"])
            check_resume(checkpoint_path, saved["run"], args)
        elif checkpoint_path.exists():
            raise UsageError(f"argument --out: {out} already holds a run; add --resume to continue it, "
                             "or choose another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"argument --out: cannot create {out} ({e.strerror})") from None
        # Data: both tasks, all splits, tokenized once (and cached).
        cache = None if args.no_data_cache else Path(args.data) / ".cache"
        splits = load_splits(args.data, tokenizer, args.max_len, cache_dir=cache)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    splits = {task: {s: limit_split(part, args.limit) for s, part in by.items()}
              for task, by in splits.items()}
    train = {task: by["train"] for task, by in splits.items()}
    pad_id = tokenizer.token_to_id("[PAD]")
    data_seconds = time.perf_counter() - started
    for task, by in splits.items():
        print(f"{task}: " + ", ".join(f"{s} {len(p):,} ({sum(p.truncated)} truncated)" for s, p in by.items()))

    # Model, freezing, optimizer.
    model = MultiTaskModel(bert, args.pool, args.embed_dim, args.normalize, n_classes=len(AG_CLASSES),
                           n_tags=len(NER_TAGS), head_dropout=args.head_dropout).to(device)
    gradual = args.unfreeze == "gradual"

    def frozen_at(epoch):
        return freeze.gradual_frozen(epoch, num_layers, base_frozen) if gradual else base_frozen

    freeze.apply_freeze(model, frozen_at(0))
    print(f"parameters (--freeze {args.freeze}{', --unfreeze gradual' if gradual else ''}):")
    print(freeze.describe(model))
    rates = lr_schedule.part_rates(num_layers, args.lr, args.lr_decay, args.head_lr, args.cls_lr, args.ner_lr)
    groups = lr_schedule.param_groups(model, rates, args.weight_decay)
    every_part = freeze.backbone_parts(num_layers) | {"cls_head", "ner_head"}
    trains = any(not every_part <= frozen_at(epoch) for epoch in range(args.epochs))
    optimizer = torch.optim.AdamW(groups or [{"params": [], "name": "none", "base_lr": 0.0}],
                                  fused=device.type == "cuda")
    print("optimizer groups:\n" + lr_schedule.format_groups(groups))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    precision = {None: "fp32", torch.float16: "fp16 autocast + GradScaler", torch.bfloat16: "bf16 autocast"}
    print(f"device {device}, {precision[amp_dtype]}" + (", torch.compile on the encoder" if args.compile else ""))
    if args.compile:
        model.bert.compile()  # in place: parameter names, checkpoints and model.features stay as they are

    def release(epoch):
        """Gradual unfreezing at the start of `epoch`: free the next part, add its optimizer groups."""
        released = freeze.apply_freeze(model, frozen_at(epoch))
        for group in lr_schedule.param_groups(model, rates, args.weight_decay, names=set(released)):
            optimizer.add_param_group(group)
        return released

    sampler = MultiTaskSampler({t: part.lengths() for t, part in train.items()}, args.batch_size, args.seed,
                               args.group_window)
    steps_per_epoch = len(sampler.epoch(0))
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup * total_steps)
    state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "history": [], "skipped_steps": 0,
             "train_seconds": 0.0, "eval_seconds": 0.0, "loss_sum": 0.0, "loss_count": 0, "run": vars(args)}
    if args.resume:
        # Replay the unfreezing the saved run had done, so the optimizer has the same groups.
        for epoch in range(1, saved["epoch"] + (saved["batch"] > 0)) if gradual else ():
            release(epoch)
        try:
            state = load_checkpoint(checkpoint_path, model, optimizer, scaler)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        state["run"] = vars(args)
        print(f"resumed from {checkpoint_path}: epoch {state['epoch'] + 1}, batch {state['batch']}, "
              f"step {state['step']}")

    if not trains:
        print(f"--freeze {args.freeze}: nothing trains; evaluating the model as it is")
    cache = None
    if trains and not gradual and freeze.backbone_parts(num_layers) <= base_frozen and not args.no_cache:
        cache = build_feature_cache(model, train, device, amp_dtype, 2 * args.batch_size, pad_id,
                                    args.cache_limit_mb, pad_multiple)
    print(f"training: {args.epochs} epochs x {steps_per_epoch} steps ({sampler.per_task:,} examples per task "
          f"per epoch, batch {args.batch_size}); warmup {warmup_steps} steps")
    with stop_on_signals() as stop:
        for epoch in range(state["epoch"], args.epochs if trains else 0):
            if gradual and epoch > 0 and state["batch"] == 0:
                released = release(epoch)
                print(f"epoch {epoch + 1}: unfroze {len(released)} tensors\n{freeze.describe(model)}")
            freeze.set_train_mode(model, frozen_at(epoch), num_layers)
            batches = sampler.epoch(epoch)
            interval = {"ag": [], "ner": []}
            interval_start, interval_examples = time.perf_counter(), 0
            epoch_start, epoch_examples = time.perf_counter(), 0
            for b in range(state["batch"], len(batches)):
                task, indices = batches[b]
                factor = lr_schedule.lr_factor(state["step"], total_steps, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                batch = to_device(collate(train[task], indices, pad_id, pad_multiple), device)
                with autocast:
                    if cache is None:
                        logits = model(batch["input_ids"], batch["attention_mask"], task)
                    else:
                        features = cached_features(cache, task, indices, batch["input_ids"].shape[1])
                        logits = model.head(features, task)
                loss = task_loss(logits, batch["labels"], task)
                if loss.requires_grad:  # False when all of this task's path is frozen: nothing to update
                    scaler.scale(loss).backward()
                    state["skipped_steps"] += optimizer_step(optimizer, scaler, args.clip)
                state["step"] += 1
                state["batch"] = b + 1
                interval[task].append(loss.detach())
                interval_examples += len(indices)
                epoch_examples += len(indices)

                if state["step"] % args.log_every == 0 or b + 1 == len(batches):
                    losses = drain_losses(interval, state)
                    speed = interval_examples / (time.perf_counter() - interval_start)
                    eta = (total_steps - state["step"]) * args.batch_size / speed
                    shown = " ".join(f"{t} {sum(losses[t]) / len(losses[t]):.4f}" if t in losses else f"{t} -"
                                     for t in interval)
                    skipped = f" | {state['skipped_steps']} skipped steps" if scaler.is_enabled() else ""
                    print(f"step {state['step']}/{total_steps} | epoch {epoch + 1} | loss {shown} | "
                          f"{current_rates(optimizer)} | {speed:.1f} samples/s | ETA {duration(eta)}{skipped}",
                          flush=True)
                    interval_start, interval_examples = time.perf_counter(), 0
                if stop["signal"] is not None:
                    drain_losses(interval, state)
                    state["epoch"] = epoch
                    state["train_seconds"] += time.perf_counter() - epoch_start
                    save_checkpoint(checkpoint_path, model, optimizer, scaler, state)
                    print(f"stopped by signal {stop['signal']} at step {state['step']}: checkpoint saved; "
                          f"continue with --out {out} --resume", file=sys.stderr)
                    return 128 + stop["signal"]
            epoch_seconds = time.perf_counter() - epoch_start
            state["train_seconds"] += epoch_seconds

            # Evaluate on validation; keep the best model.
            eval_start = time.perf_counter()
            metrics = evaluate(model, splits["ag"]["valid"], splits["ner"]["valid"], device, amp_dtype,
                               2 * args.batch_size, pad_id, pad_multiple)
            state["eval_seconds"] += time.perf_counter() - eval_start
            record = {"epoch": epoch + 1, "step": state["step"], "split": "valid",
                      **{k: metrics[k] for k in ("ag_accuracy", "ner_f1", "ner_precision", "ner_recall")},
                      "train_loss": state["loss_sum"] / max(state["loss_count"], 1),
                      "elapsed_s": round(time.perf_counter() - started, 1),
                      "samples_per_s": round(epoch_examples / epoch_seconds, 1)}
            state["loss_sum"], state["loss_count"] = 0.0, 0
            print(f"epoch {epoch + 1} valid: AG accuracy {metrics['ag_accuracy']:.4f} | "
                  f"NER F1 {metrics['ner_f1']:.4f} (P {metrics['ner_precision']:.4f} R {metrics['ner_recall']:.4f})")
            state["history"].append(record)
            write_json(out / "metrics.jsonl", state["history"], lines=True)
            score = (metrics["ag_accuracy"] + metrics["ner_f1"]) / 2
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"score": score, "epoch": epoch + 1}
                save_multitask(model, out, extra={"run": vars(args)})
                print(f"  best so far: saved {out / 'model.safetensors'}")
            state["epoch"], state["batch"] = epoch + 1, 0
            save_checkpoint(checkpoint_path, model, optimizer, scaler, state)
            if args.stop_after is not None and epoch + 1 == args.stop_after and epoch + 1 < args.epochs:
                print(f"stopping after epoch {epoch + 1} (--stop-after); continue with --out {out} --resume")
                return 0

    # Final evaluation of the best model on test.
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if state["best"] is None:  # nothing trained: keep the model as it is
        save_multitask(model, out, extra={"run": vars(args)})
    else:
        model = load_multitask(out, device)
        if args.compile:
            model.bert.compile()
    eval_start = time.perf_counter()
    test = evaluate(model, splits["ag"]["test"], splits["ner"]["test"], device, amp_dtype, 2 * args.batch_size,
                    pad_id, pad_multiple)
    state["eval_seconds"] += time.perf_counter() - eval_start
    print(f"test: AG accuracy {test['ag_accuracy']:.4f} | NER F1 {test['ner_f1']:.4f} "
          f"(P {test['ner_precision']:.4f} R {test['ner_recall']:.4f})")
    summary = {"split": "test", **test, "best_epoch": state["best"] and state["best"]["epoch"],
               "config": vars(args), "device": str(device), "precision": precision[amp_dtype],
               "timings_s": {"data": round(data_seconds, 2), "train": round(state["train_seconds"], 2),
                             "eval": round(state["eval_seconds"], 2),
                             "total": round(time.perf_counter() - started, 2)},
               "parameters": parameters,
               "skipped_steps": state["skipped_steps"], "peak_memory_mb": round(peak_memory_mb(device), 1)}
    write_json(out / "summary.json", summary)
    print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}, {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
