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
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
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
from metrics import entity_counts, scores_from_counts
from model import (
    NORMS,
    POOLS,
    CheckpointError,
    MultiTaskModel,
    load_multitask,
    load_pretrained,
    parameter_part,
    save_multitask,
)


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


def init_distributed(device_name):
    """(rank, world_size, device). Under torchrun, which sets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT, join the process group first:
    NCCL with one GPU per process (GPU number LOCAL_RANK), or gloo on CPUs."""
    device = pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def control_group(world_size, device):
    """A gloo group for small host-side decisions: agreeing on one number needs no GPU sync."""
    if world_size == 1:
        return None
    return dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD


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


def task_loss(logits, labels, task, normalizer=None):
    """Cross-entropy in fp32 over examples (ag) or first word pieces (ner).

    The mean, or with a normalizer the sum divided by it. Data-parallel runs
    pass (labels in the global batch) / (number of ranks): DDP averages the
    ranks' gradients, and that average is then the gradient of the mean over
    the global batch, however the labels fall between ranks.
    """
    if task == "ag":
        logits, labels = logits.float(), labels
    else:
        logits, labels = logits.float().flatten(0, 1), labels.flatten()
    if normalizer is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / normalizer


def label_counts(part):
    """Per example, how many labels its loss counts: 1 (ag), or its labelled word pieces (ner)."""
    if part.task == "ag":
        return np.ones(len(part), dtype=np.int64)
    return np.array([sum(label != IGNORE_INDEX for label in labels) for labels in part.labels], dtype=np.int64)


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


ENTITY_TYPES = sorted({tag[2:] for tag in NER_TAGS if tag != "O"})


@torch.no_grad()
def evaluate(model, ag, ner, device, amp_dtype, batch_size, pad_id, multiple=1, rank=0, world_size=1):
    """AG accuracy and CoNLL entity scores on one split.

    With world_size > 1 the batches are dealt out to the ranks (batch b to
    rank b % world_size) and the counts (correct, and true positives,
    predictions and gold entities per type) are summed over ranks with
    all_reduce: every rank gets exactly the scores of a single process.
    """
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def predictions(part):
        """(example indices, argmax per row) for this rank's batches, similar lengths batched together."""
        order = np.argsort(part.lengths(), kind="stable")
        for b, start in enumerate(range(0, len(part), batch_size)):
            if b % world_size == rank:
                indices = order[start:start + batch_size].tolist()
                batch = to_device(collate(part, indices, pad_id, multiple), device)
                with autocast:
                    predicted = model(batch["input_ids"], batch["attention_mask"], part.task).argmax(-1).tolist()
                yield indices, predicted

    correct = sum(p == ag.labels[i] for indices, predicted in predictions(ag) for p, i in zip(predicted, indices))
    gold, tags = [], []
    for indices, pieces in predictions(ner):
        for row, i in enumerate(indices):
            gold.append(ner.word_tags[i])
            tags.append(word_tags(pieces[row], ner.first_piece[i]))
    counts = entity_counts(gold, tags)
    if world_size > 1:
        flat = [correct] + [n for kind in ENTITY_TYPES for n in counts.get(kind, (0, 0, 0))]
        summed = torch.tensor(flat, dtype=torch.int64, device=device)
        dist.all_reduce(summed)  # SUM
        correct, *flat = summed.tolist()
        counts = {kind: flat[3 * k:3 * k + 3] for k, kind in enumerate(ENTITY_TYPES) if any(flat[3 * k:3 * k + 3])}
    scores = scores_from_counts(counts)
    return {"ag_accuracy": correct / len(ag) if len(ag) else 0.0, "ner_f1": scores["f1"],
            "ner_precision": scores["precision"], "ner_recall": scores["recall"],
            "ner_per_type": scores["per_type"]}


# Flags that may change between a run and its --resume; every other flag must stay the same.
RESUME_MAY_CHANGE = {"out", "resume", "stop_after", "log_every", "no_data_cache", "no_cache", "cache_limit_mb",
                     "device", "compile"}


def rng_states(world_size):
    """Every rank's random-number state (rank 0 gets the list, the others None); all ranks must call."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world_size == 1:
        return [mine]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered if dist.get_rank() == 0 else None


def save_checkpoint(path, model, optimizer, scaler, state, rngs):
    """Everything --resume needs, in one safetensors file written atomically (rank 0 only)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, values in optim["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    for rank, states in enumerate(rngs):  # rng.torch, rng.cuda for rank 0; rng.torch.1 ... for the others
        for kind, value in states.items():
            tensors[f"rng.{kind}" + (f".{rank}" if rank else "")] = value
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


def load_checkpoint(path, model, optimizer, scaler, rank=0):
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
    suffix = f".{rank}" if rank else ""
    torch.set_rng_state(tensors["rng.torch" + suffix])
    if "rng.cuda" + suffix in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda" + suffix])
    return json.loads(metadata["state"])


@torch.no_grad()
def build_feature_cache(model, train, device, amp_dtype, batch_size, pad_id, limit_mb, multiple=1, log=print):
    """Run the frozen backbone once over every training example and keep what the heads read:
    one pooled vector per AG example, the token states of each CoNLL sentence. None if over the limit."""
    hidden = model.bert.config.hidden_size
    dtype = amp_dtype or torch.float32  # kept in the AMP dtype: half the memory, and the heads cast to it anyway
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    item = torch.finfo(dtype).bits // 8
    need = (len(train["ag"]) + int(train["ner"].lengths().sum())) * hidden * item / 2**20
    if need > limit_mb:
        log(f"frozen-backbone cache: would need {need:,.0f} MB, over --cache-limit-mb {limit_mb}; not caching")
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
    log(f"frozen-backbone cache: {len(train['ag']) + len(train['ner']):,} examples, {need:,.0f} MB on {device}, "
        f"built in {time.perf_counter() - start:.1f} s; the steps now run only the heads")
    return store


class CachedHeads(torch.nn.Module):
    """The heads alone, fed from the frozen-backbone cache: a module of its own, so that DDP can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features, task):
        return self.model.head(features, task)


def cached_features(store, task, indices, width):
    """Stack (ag) or zero-pad to width (ner) the cached features of a batch; padding is never read by the loss."""
    rows = [store[task][i] for i in indices]
    if task == "ag":
        return torch.stack(rows)  # (B, H)
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])  # (B, T, H)
    for r, x in enumerate(rows):
        out[r, :len(x)] = x
    return out


def drain_losses(interval, state, world_size=1):
    """Turn the interval's loss tensors into numbers and add them to the epoch's running sum.

    .tolist() waits for the GPU, so the loop calls this only when it logs or stops.
    With several ranks, the ranks' losses of a step are summed and divided by
    the number of ranks: that is the mean loss of the global batch (see task_loss).
    """
    losses = {}
    for task, values in interval.items():
        if values:
            stacked = torch.stack(values)
            if world_size > 1:  # every rank has the same tasks at the same steps
                dist.all_reduce(stacked)
                stacked /= world_size
            losses[task] = stacked.tolist()
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


def agree(number, group):
    """The largest of the ranks' numbers, on every rank (a collective: all ranks must call it)."""
    t = torch.tensor([number])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    started = time.perf_counter()
    rank, world_size = 0, 1
    try:
        check_args(args)
        rank, world_size, device = init_distributed(args.device)
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
        if world_size > 1 and args.out is None:
            raise UsageError("argument --out: give --out under torchrun, so that every process uses the same folder")
        out = Path(args.out or time.strftime("runs/%Y%m%d-%H%M%S"))
        checkpoint_path = out / "checkpoint" / "checkpoint.safetensors"
        if args.resume:
            if not checkpoint_path.exists():
                raise UsageError(f"argument --resume: {checkpoint_path} not found")
            saved, _ = read_checkpoint(checkpoint_path)
            saved = json.loads(saved["state"])
            check_resume(checkpoint_path, saved["run"], args)
            if saved.get("world_size", 1) != world_size:
                raise UsageError(f"argument --resume: {checkpoint_path} was written by {saved.get('world_size', 1)} "
                                 f"processes, this run has {world_size}; resume with the same number, so that "
                                 "the global batches stay the same")
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
    log = print if rank == 0 else (lambda *_, **__: None)  # only rank 0 speaks, and only rank 0 writes
    torch.manual_seed(args.seed)  # the same initial heads on every rank
    splits = {task: {s: limit_split(part, args.limit) for s, part in by.items()}
              for task, by in splits.items()}
    train = {task: by["train"] for task, by in splits.items()}
    pad_id = tokenizer.token_to_id("[PAD]")
    data_seconds = time.perf_counter() - started
    for task, by in splits.items():
        log(f"{task}: " + ", ".join(f"{s} {len(p):,} ({sum(p.truncated)} truncated)" for s, p in by.items()))

    # Model, freezing, optimizer.
    model = MultiTaskModel(bert, args.pool, args.embed_dim, args.normalize, n_classes=len(AG_CLASSES),
                           n_tags=len(NER_TAGS), head_dropout=args.head_dropout).to(device)
    gradual = args.unfreeze == "gradual"

    def frozen_at(epoch):
        return freeze.gradual_frozen(epoch, num_layers, base_frozen) if gradual else base_frozen

    freeze.apply_freeze(model, frozen_at(0))
    log(f"parameters (--freeze {args.freeze}{', --unfreeze gradual' if gradual else ''}):")
    log(freeze.describe(model))
    rates = lr_schedule.part_rates(num_layers, args.lr, args.lr_decay, args.head_lr, args.cls_lr, args.ner_lr)
    groups = lr_schedule.param_groups(model, rates, args.weight_decay)
    every_part = freeze.backbone_parts(num_layers) | {"cls_head", "ner_head"}
    trains = any(not every_part <= frozen_at(epoch) for epoch in range(args.epochs))
    optimizer = torch.optim.AdamW(groups or [{"params": [], "name": "none", "base_lr": 0.0}],
                                  fused=device.type == "cuda")
    log("optimizer groups:\n" + lr_schedule.format_groups(groups))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    precision = {None: "fp32", torch.float16: "fp16 autocast + GradScaler", torch.bfloat16: "bf16 autocast"}
    log(f"device {device}, {precision[amp_dtype]}" + (", torch.compile on the encoder" if args.compile else ""))
    if args.compile:
        model.bert.compile()  # in place: parameter names, checkpoints and model.features stay as they are
    if world_size > 1:
        torch.manual_seed(args.seed + 1_000_003 * rank)  # different dropout on each rank

    def step_module(cache):
        """What each step calls: the model, or its heads alone when they read cached features;
        returned as (plain module, the same wrapped in DDP or not).

        Data-parallel runs wrap it in DDP, which all-reduces (averages) the
        gradients during backward. Every rank runs the same task at the same
        step (MultiTaskSampler), so the other head has no gradient on every
        rank alike; find_unused_parameters lets DDP finish the step without
        those gradients, at the cost of one walk over the autograd graph per
        step. DDP fixes its parameter list when built, so gradual unfreezing
        builds a new one after each release.
        """
        module = model if cache is None else CachedHeads(model)
        if world_size == 1 or not any(p.requires_grad for p in module.parameters()):
            return module, module
        return module, DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                               find_unused_parameters=True)

    def task_trains(task):
        """Does a step of this task update anything? Not when all of its path is frozen.

        The path: embeddings, layers, the task's head, and the pooler only
        for classification with --pool cls (no other step reads it).
        """
        path = {"ag": "cls_head", "ner": "ner_head"}[task]
        skip = {"cls_head", "ner_head", "pooler"} - {path} - ({"pooler"} if task == "ag" and args.pool == "cls" else set())
        return any(p.requires_grad for n, p in model.named_parameters() if parameter_part(n) not in skip)

    def release(epoch):
        """Gradual unfreezing at the start of `epoch`: free the next part, add its optimizer groups."""
        released = freeze.apply_freeze(model, frozen_at(epoch))
        for group in lr_schedule.param_groups(model, rates, args.weight_decay, names=set(released)):
            optimizer.add_param_group(group)
        return released

    sampler = MultiTaskSampler({t: part.lengths() for t, part in train.items()}, args.batch_size, args.seed,
                               args.group_window, rank, world_size)
    n_labels = {task: label_counts(part) for task, part in train.items()}
    steps_per_epoch = len(sampler.epoch(0))
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup * total_steps)
    state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "history": [], "skipped_steps": 0,
             "train_seconds": 0.0, "eval_seconds": 0.0, "loss_sum": 0.0, "loss_count": 0, "run": vars(args),
             "world_size": world_size}
    if args.resume:
        # Replay the unfreezing the saved run had done, so the optimizer has the same groups.
        for epoch in range(1, saved["epoch"] + (saved["batch"] > 0)) if gradual else ():
            release(epoch)
        try:
            state = load_checkpoint(checkpoint_path, model, optimizer, scaler, rank)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        state["run"] = vars(args)
        log(f"resumed from {checkpoint_path}: epoch {state['epoch'] + 1}, batch {state['batch']}, "
            f"step {state['step']}")

    if not trains:
        log(f"--freeze {args.freeze}: nothing trains; evaluating the model as it is")
    cache = None
    if trains and not gradual and freeze.backbone_parts(num_layers) <= base_frozen and not args.no_cache:
        cache = build_feature_cache(model, train, device, amp_dtype, 2 * args.batch_size, pad_id,
                                    args.cache_limit_mb, pad_multiple, log)
    plain, runner = step_module(cache)
    control = control_group(world_size, device)
    batch_shown = (f"global batch {sampler.batch_size} = {args.batch_size} per rank x {world_size} ranks"
                   if world_size > 1 else f"batch {args.batch_size}")
    log(f"training: {args.epochs} epochs x {steps_per_epoch} steps ({sampler.per_task:,} examples per task "
        f"per epoch, {batch_shown}); warmup {warmup_steps} steps")
    best_weights = None  # the best epoch's weights, kept in memory on every rank
    with stop_on_signals() as stop:
        for epoch in range(state["epoch"], args.epochs if trains else 0):
            if gradual and epoch > 0 and state["batch"] == 0:
                released = release(epoch)
                plain = runner = None  # free the old DDP and its gradient hooks before building the next
                plain, runner = step_module(cache)  # DDP must know the new trainable parameters
                log(f"epoch {epoch + 1}: unfroze {len(released)} tensors\n{freeze.describe(model)}")
            freeze.set_train_mode(model, frozen_at(epoch), num_layers)
            trains_now = {task: task_trains(task) for task in train}
            batches = sampler.epoch(epoch)
            interval = {"ag": [], "ner": []}
            interval_start, interval_examples = time.perf_counter(), 0
            epoch_start, epoch_examples = time.perf_counter(), 0
            for b in range(state["batch"], len(batches)):
                task, global_batch = batches[b]
                indices = sampler.share(global_batch)  # this rank's part of the global batch
                factor = lr_schedule.lr_factor(state["step"], total_steps, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                batch = to_device(collate(train[task], indices, pad_id, pad_multiple), device)
                calls = runner if trains_now[task] else plain  # a step with nothing to train bypasses DDP
                with autocast:
                    if cache is None:
                        logits = calls(batch["input_ids"], batch["attention_mask"], task)
                    else:
                        features = cached_features(cache, task, indices, batch["input_ids"].shape[1])
                        logits = calls(features, task)
                normalizer = float(n_labels[task][global_batch].sum()) / world_size
                loss = task_loss(logits, batch["labels"], task, normalizer)
                if loss.requires_grad:  # False when all of this task's path is frozen: nothing to update
                    scaler.scale(loss).backward()
                    state["skipped_steps"] += optimizer_step(optimizer, scaler, args.clip)
                state["step"] += 1
                state["batch"] = b + 1
                interval[task].append(loss.detach())
                interval_examples += len(global_batch)
                epoch_examples += len(global_batch)

                at_log = state["step"] % args.log_every == 0 or b + 1 == len(batches)
                if world_size > 1:  # all ranks must stop at the same step: they agree after every step
                    stop["signal"] = agree(stop["signal"] or 0, control) or None
                stopping = stop["signal"] is not None
                if at_log:
                    losses = drain_losses(interval, state, world_size)
                    speed = interval_examples / (time.perf_counter() - interval_start)
                    eta = (total_steps - state["step"]) * sampler.batch_size / speed
                    shown = " ".join(f"{t} {sum(losses[t]) / len(losses[t]):.4f}" if t in losses else f"{t} -"
                                     for t in interval)
                    skipped = f" | {state['skipped_steps']} skipped steps" if scaler.is_enabled() else ""
                    log(f"step {state['step']}/{total_steps} | epoch {epoch + 1} | loss {shown} | "
                        f"{current_rates(optimizer)} | {speed:.1f} samples/s | ETA {duration(eta)}{skipped}",
                        flush=True)
                    interval_start, interval_examples = time.perf_counter(), 0
                if stopping:
                    drain_losses(interval, state, world_size)
                    state["epoch"] = epoch
                    state["train_seconds"] += time.perf_counter() - epoch_start
                    rngs = rng_states(world_size)
                    signum = stop["signal"]  # the same on every rank, whichever rank was signalled
                    if rank == 0:
                        save_checkpoint(checkpoint_path, model, optimizer, scaler, state, rngs)
                        print(f"stopped by signal {signum} at step {state['step']}: checkpoint saved; "
                              f"continue with --out {out} --resume", file=sys.stderr)
                    return 128 + signum
            epoch_seconds = time.perf_counter() - epoch_start
            state["train_seconds"] += epoch_seconds

            # Evaluate on validation; keep the best model.
            eval_start = time.perf_counter()
            metrics = evaluate(model, splits["ag"]["valid"], splits["ner"]["valid"], device, amp_dtype,
                               2 * args.batch_size, pad_id, pad_multiple, rank, world_size)
            state["eval_seconds"] += time.perf_counter() - eval_start
            record = {"epoch": epoch + 1, "step": state["step"], "split": "valid",
                      **{k: metrics[k] for k in ("ag_accuracy", "ner_f1", "ner_precision", "ner_recall")},
                      "train_loss": state["loss_sum"] / max(state["loss_count"], 1),
                      "elapsed_s": round(time.perf_counter() - started, 1),
                      "samples_per_s": round(epoch_examples / epoch_seconds, 1)}
            state["loss_sum"], state["loss_count"] = 0.0, 0
            log(f"epoch {epoch + 1} valid: AG accuracy {metrics['ag_accuracy']:.4f} | "
                f"NER F1 {metrics['ner_f1']:.4f} (P {metrics['ner_precision']:.4f} R {metrics['ner_recall']:.4f})")
            state["history"].append(record)
            if rank == 0:
                write_json(out / "metrics.jsonl", state["history"], lines=True)
            score = (metrics["ag_accuracy"] + metrics["ner_f1"]) / 2
            if state["best"] is None or score > state["best"]["score"]:
                state["best"] = {"score": score, "epoch": epoch + 1}
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                if rank == 0:
                    save_multitask(model, out, extra={"run": vars(args)})
                log(f"  best so far: saved {out / 'model.safetensors'}")
            state["epoch"], state["batch"] = epoch + 1, 0
            rngs = rng_states(world_size)
            if rank == 0:
                save_checkpoint(checkpoint_path, model, optimizer, scaler, state, rngs)
            if args.stop_after is not None and epoch + 1 == args.stop_after and epoch + 1 < args.epochs:
                log(f"stopping after epoch {epoch + 1} (--stop-after); continue with --out {out} --resume")
                return 0

    # Final evaluation of the best model on test.
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if state["best"] is None:  # nothing trained: keep the model as it is
        if rank == 0:
            save_multitask(model, out, extra={"run": vars(args)})
    elif best_weights is not None:
        model.load_state_dict(best_weights)
    else:  # resumed after the best epoch: its weights are on disk (every rank must see OUT)
        model.load_state_dict(load_multitask(out).state_dict())
    eval_start = time.perf_counter()
    test = evaluate(model, splits["ag"]["test"], splits["ner"]["test"], device, amp_dtype, 2 * args.batch_size,
                    pad_id, pad_multiple, rank, world_size)
    state["eval_seconds"] += time.perf_counter() - eval_start
    log(f"test: AG accuracy {test['ag_accuracy']:.4f} | NER F1 {test['ner_f1']:.4f} "
        f"(P {test['ner_precision']:.4f} R {test['ner_recall']:.4f})")
    summary = {"split": "test", **test, "best_epoch": state["best"] and state["best"]["epoch"],
               "config": vars(args), "device": str(device), "precision": precision[amp_dtype],
               "timings_s": {"data": round(data_seconds, 2), "train": round(state["train_seconds"], 2),
                             "eval": round(state["eval_seconds"], 2),
                             "total": round(time.perf_counter() - started, 2)},
               "parameters": parameters,
               "skipped_steps": state["skipped_steps"], "peak_memory_mb": round(peak_memory_mb(device), 1)}
    if rank == 0:
        write_json(out / "summary.json", summary)
    log(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}, {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
