"""Train the multi-task model (Task 2): AG News topics and CoNLL-2003 entities on one encoder.

    python train.py --pool max --freeze backbone
    python train.py --model DIR --data DIR --epochs 3 --amp bf16 --out runs/NAME
    python train.py --out runs/NAME --resume          # continue an interrupted run
    python predict.py --model runs/NAME "Apple opened a store in London."   # then use it

Reading order: the flags; train_step, one step (rates, batch, forward, loss,
backward, clip, step); then the run in phases: set_up (returns a Run),
train_epoch, end_of_epoch (evaluate, keep the best, checkpoint) and
final_test, which run_training() calls in turn. Freezing lives in freeze.py,
a frozen backbone's features in features.py, learning rates in lr.py, the checkpoint in
checkpoint.py, the collectives of a torchrun job in distributed.py, and the
device and precision in runtime.py. What a run writes to --out is listed
in README.md.
"""

import argparse
import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import distributed
import freeze
from checkpoint import Checkpoint, Progress
from data import (AG_CLASSES, IGNORE_INDEX, NER_TAGS, DataError, MultiTaskSampler, batches_by_length, check_fits,
                  collate, copy_tokenizer, length_batches, limit_split, load_splits, load_tokenizer, word_tags)
from features import DiskCache, FeatureStore
from lr import format_groups, lr_factor, param_groups, part_rates
from metrics import entity_counts, scores_from_counts
from model import (NORMS, POOLS, CheckpointError, MultiTaskModel, load_multitask, load_pretrained, pooling_note,
                   save_multitask)
from runtime import PRECISION_NAMES, Place, Report, UsageError, duration, optimizer_step, pick_amp, write_json


class Renamed(argparse.Action):
    """A flag that was renamed: refuse it with one line that names its successor."""

    def __init__(self, option_strings, dest, hint, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"error: argument {option_string}: renamed; {self.hint}", file=sys.stderr)
        raise SystemExit(2)


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
    g.add_argument("--no-feature-store", action="store_true",
                   help="with the whole backbone frozen, run it on every step instead of computing its outputs once")
    g.add_argument("--feature-store-limit-mb", type=int, default=4096,
                   help="largest frozen-backbone feature store to keep on the training device; past it, none")
    g.add_argument("--feature-cache-limit-mb", type=int, default=10240,
                   help="disk space for frozen-backbone features kept in DATA/.cache/features for later runs "
                        "(least recently used go first; 0: store none)")
    g.add_argument("--no-cache", action=Renamed,
                   hint="use --no-feature-store (the frozen backbone's outputs) or --no-data-cache (tokenized data)")
    g.add_argument("--cache-limit-mb", action=Renamed, hint="use --feature-store-limit-mb")
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
                      ("embed_dim", 1), ("stop_after", 1), ("group_window", 0), ("feature_store_limit_mb", 0),
                      ("feature_cache_limit_mb", 0)):
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


# --- The loss, one step, and evaluation -------------------------------------------------

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


def train_step(run, task, global_batch):
    """One training step on this rank's part of a global batch; returns the loss (a tensor: no GPU sync)."""
    progress, optimizer = run.progress, run.optimizer
    # learning rates: layer-wise base rates (lr.py) times the warmup/decay schedule
    factor = lr_factor(progress.step, run.total_steps, run.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    # batch
    indices = run.sampler.share(global_batch)  # this rank's part of the global batch
    batch = run.place.to_device(collate(run.splits[task]["train"], indices, run.pad_id, run.pad_multiple))
    # forward: the model, or only its heads on stored features (freeze.Runner)
    with run.place.autocast():
        logits = run.runner(task, batch, indices)
    normalizer = float(run.n_labels[task][global_batch].sum()) / run.place.world_size
    loss = task_loss(logits, batch["labels"], task, normalizer)
    # backward, clip, step
    if loss.requires_grad:  # False when all of this task's path is frozen: nothing to update
        run.scaler.scale(loss).backward()
        progress.skipped_steps += optimizer_step(optimizer, run.scaler, run.args.clip)
    progress.step += 1
    return loss.detach()


ENTITY_TYPES = sorted({tag[2:] for tag in NER_TAGS if tag != "O"})


@torch.no_grad()
def evaluate(model, ag, ner, place, batch_size, pad_id, multiple=1, features=None, log=None, what="evaluation"):
    """AG accuracy and CoNLL entity scores on one split (ag and ner: TaskData).

    features: {task: features.Features} of this split, from a frozen backbone;
    then only the heads run. With several ranks, batch b goes to rank b %
    world_size, and the counts (correct, and true positives, predictions and
    gold entities per type) are summed over ranks: every rank gets exactly the
    scores of a single process. log: progress lines every 10 s.
    """
    model.eval()
    cost = sum(len(ids) for part in (ag, ner) for ids in part.input_ids)  # word pieces: the ETA follows them
    report = Report(f"{what} pass", len(ag) + len(ner), log, total_cost=cost) if log else None

    def predictions(part):
        """(example indices, argmax per row) for this rank's batches."""
        for indices, batch in batches_by_length(part, batch_size, pad_id, multiple, place.rank, place.world_size):
            batch = place.to_device(batch)
            with place.autocast():
                if features is None:
                    logits = model(batch["input_ids"], batch["attention_mask"], part.task)
                else:
                    logits = model.head(features[part.task].batch(indices, batch["input_ids"].shape[1]), part.task)
            if report:  # this rank's count, times the ranks: about the global count
                pieces = sum(len(part.input_ids[i]) for i in indices)
                report.update(len(indices) * place.world_size, pieces * place.world_size)
            yield indices, logits.argmax(-1).tolist()

    correct = sum(p == ag.labels[i] for indices, predicted in predictions(ag) for p, i in zip(predicted, indices))
    gold, tags = [], []
    for indices, pieces in predictions(ner):
        for row, i in enumerate(indices):
            gold.append(ner.word_tags[i])
            tags.append(word_tags(pieces[row], ner.first_piece[i]))
    counts = entity_counts(gold, tags)
    flat = [correct] + [n for kind in ENTITY_TYPES for n in counts.get(kind, (0, 0, 0))]
    correct, *flat = distributed.sum_counts(flat, place)
    counts = {kind: flat[3 * k:3 * k + 3] for k, kind in enumerate(ENTITY_TYPES) if any(flat[3 * k:3 * k + 3])}
    scores = scores_from_counts(counts)
    return {"ag_accuracy": correct / len(ag) if len(ag) else 0.0, "ner_f1": scores["f1"],
            "ner_precision": scores["precision"], "ner_recall": scores["recall"],
            "ner_per_type": scores["per_type"]}


# --- Set-up ----------------------------------------------------------------------------

@dataclass
class Run:
    """What the phases share. set_up() builds it; the phases move `progress` on."""
    args: argparse.Namespace
    out: Path  # the run folder
    place: Place  # device, autocast dtype, rank of world_size
    log: callable  # print on rank 0, nothing on the other ranks
    splits: dict  # task -> split -> TaskData
    pad_id: int
    pad_multiple: int  # batch widths are rounded up to a multiple of this (8 with --compile)
    model: MultiTaskModel
    plan: freeze.Plan  # the frozen parts of every epoch
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: MultiTaskSampler
    n_labels: dict  # task -> labels per training example (task_loss's normalizer)
    steps_per_epoch: int
    progress: Progress  # the counters every checkpoint saves
    control: object  # the process group for agreeing on a stop (None on one process)
    started: float  # time.perf_counter() at start
    data_seconds: float
    best_weights: dict = None  # the best epoch's weights, kept in memory on every rank
    features: FeatureStore = None  # a frozen backbone's features of every example the run reads
    runner: freeze.Runner = None  # what a step calls

    @property
    def total_steps(self):
        return self.args.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self):
        return int(self.args.warmup * self.total_steps)

    @property
    def rates(self):
        return base_rates(self.args, self.plan.num_layers)

    @property
    def epochs_to_run(self):
        """The epochs this invocation trains: up to --stop-after N if the run has not passed epoch N yet,
        else to the last; none when nothing trains."""
        args, done = self.args, self.progress.epoch
        if not self.plan.trains(args.epochs):
            return range(0)
        stop_after = args.stop_after is not None and done < args.stop_after < args.epochs
        return range(done, args.stop_after if stop_after else args.epochs)

    @property
    def ends_with_test(self):
        """Does this invocation go on to the final test, rather than stop at --stop-after?"""
        epochs = self.epochs_to_run
        return not epochs or epochs.stop == self.args.epochs

    @property
    def eval_batch_size(self):
        """Evaluation batches: twice the training batch, since no activations are kept for backward."""
        return 2 * self.args.batch_size


def base_rates(args, num_layers):
    """part -> base learning rate, from the flags of Task 4 (lr.part_rates)."""
    return part_rates(num_layers, args.lr, args.lr_decay, args.head_lr, args.cls_lr, args.ner_lr)


def open_inputs(args):
    """Check and read everything a run starts from; any problem raises a one-line error.

    Returns (place, tokenizer, bert, plan, out, saved checkpoint or None, splits).
    """
    check_args(args)
    rank, world_size, device = distributed.init(args.device)
    place = Place(device, pick_amp(args.amp, device), rank, world_size)
    tokenizer = load_tokenizer(args.model)
    bert = load_pretrained(args.model)
    check_fits(tokenizer, bert.config, args.max_len, args.model)
    widest = -(-args.max_len // 8) * 8  # --compile pads to a multiple of 8
    if args.compile and widest > bert.config.max_len:
        raise UsageError(f"argument --compile: --max-len {args.max_len} pads up to {widest} tokens, more than "
                         f"the model's {bert.config.max_len} positions")
    try:
        plan = freeze.Plan.from_flags(args.freeze, args.unfreeze, bert.config.num_hidden_layers, bert.config.has_pooler)
    except ValueError as e:
        raise UsageError(f"argument --freeze: {e}") from None
    if plan.gradual and freeze.backbone_parts(plan.num_layers, plan.pooler) <= plan.base:
        raise UsageError(f"argument --unfreeze: gradual unfreezing releases the backbone layer by layer, but --freeze "
                         f"{args.freeze} keeps all of it frozen; gradual already starts from a frozen backbone, so "
                         "leave 'backbone' out of --freeze")
    if world_size > 1 and args.out is None:
        raise UsageError("argument --out: give --out under torchrun, so that every process uses the same folder")
    out = Path(args.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    path, saved = checkpoint.path_in(out), None
    if args.resume:
        if not path.exists():
            raise UsageError(f"argument --resume: {path} not found")
        saved = checkpoint.read(path)
        checkpoint.check_resume(path, saved.progress, vars(args), world_size)
    elif path.exists():
        raise UsageError(f"argument --out: {out} already holds a run; add --resume to continue it, "
                         "or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"argument --out: cannot create {out} ({e.strerror})") from None
    data_cache = None if args.no_data_cache else Path(args.data) / ".cache"
    splits = load_splits(args.data, tokenizer, args.max_len, cache_dir=data_cache, log=print if rank == 0 else None)
    return place, tokenizer, bert, plan, out, saved, splits


def build_model(args, bert, plan, place, log):
    """The two-head model, frozen as the plan says for epoch 0; its learning rates, optimizer and scaler."""
    model = MultiTaskModel(bert, args.pool, args.embed_dim, args.normalize, n_classes=len(AG_CLASSES),
                           n_tags=len(NER_TAGS), head_dropout=args.head_dropout).to(place.device)
    if note := pooling_note(bert.config, args.pool):
        log(note)
    freeze.apply_freeze(model, plan.frozen_at(0))
    log(f"parameters (--freeze {args.freeze}{', --unfreeze gradual' if plan.gradual else ''}):")
    log(freeze.trainable_summary(model))
    groups = param_groups(model, base_rates(args, plan.num_layers), args.weight_decay)
    optimizer = torch.optim.AdamW(groups or [{"params": [], "name": "none", "base_lr": 0.0}],
                                  fused=place.device.type == "cuda")
    if plan.trains(args.epochs):
        log("optimizer groups:\n" + format_groups(groups))
    log(f"device {place.device}, {PRECISION_NAMES[place.amp_dtype]}"
        + (", torch.compile on the encoder" if args.compile else ""))
    if args.compile:
        model.bert.compile()  # in place: parameter names, checkpoints and model.features stay as they are
    return model, optimizer, place.scaler()


def set_up(args):
    """Everything the loop needs, as a Run."""
    started = time.perf_counter()
    place, tokenizer, bert, plan, out, saved, splits = open_inputs(args)
    log = print if place.rank == 0 else (lambda *_, **__: None)  # only rank 0 speaks, and only rank 0 writes
    torch.manual_seed(args.seed)  # the same initial heads on every rank
    splits = {task: {s: limit_split(part, args.limit) for s, part in by.items()} for task, by in splits.items()}
    train = {task: by["train"] for task, by in splits.items()}
    data_seconds = time.perf_counter() - started
    for task, by in splits.items():
        log(f"{task}: " + ", ".join(f"{s} {len(p):,} ({sum(p.truncated)} truncated)" for s, p in by.items()))

    model, optimizer, scaler = build_model(args, bert, plan, place, log)
    if place.world_size > 1:
        torch.manual_seed(args.seed + 1_000_003 * place.rank)  # different dropout on each rank
    sampler = MultiTaskSampler({t: part.lengths() for t, part in train.items()}, args.batch_size, args.seed,
                               args.group_window, place.rank, place.world_size)
    steps_per_epoch = len(sampler.epoch(0))
    progress = Progress(run=vars(args), world_size=place.world_size)
    if saved is not None:
        # Replay the unfreezing the saved run had done, so the optimizer has the same groups.
        for epoch in range(1, saved.progress.epoch + (saved.progress.batch > 0)) if plan.gradual else ():
            freeze.release(model, optimizer, plan.frozen_at(epoch), base_rates(args, plan.num_layers),
                           args.weight_decay)
        progress = checkpoint.restore(saved, checkpoint.path_in(out), model, optimizer, scaler, place.rank)
        progress.run = vars(args)
        log(f"resumed from {checkpoint.path_in(out)}: epoch {progress.epoch + 1}, batch {progress.batch}, "
            f"step {progress.step}")

    pad_id, pad_multiple = bert.config.pad_token_id, 8 if args.compile else 1  # [PAD], or RoBERTa's <pad>
    run = Run(args=args, out=out, place=place, log=log, splits=splits, pad_id=pad_id, pad_multiple=pad_multiple,
              model=model, plan=plan, optimizer=optimizer, scaler=scaler, sampler=sampler,
              n_labels={task: label_counts(part) for task, part in train.items()},
              steps_per_epoch=steps_per_epoch, progress=progress,
              control=distributed.control_group(place), started=started, data_seconds=data_seconds)
    on_rank0(run, copy_tokenizer, args.model, out)  # so that OUT is a complete model folder (predict.py)
    run.features = frozen_features(run)
    run.runner = freeze.Runner(model, place, run.features and run.features.of("train"))
    if not plan.trains(args.epochs):
        log(f"--freeze {args.freeze}: nothing trains; evaluating the model as it is, on the test split only")
        return run
    shown = (f"global batch {sampler.batch_size} = {args.batch_size} per rank x {place.world_size} ranks"
             if place.world_size > 1 else f"batch {args.batch_size}")
    log(f"training: {args.epochs} epochs x {steps_per_epoch} steps ({sampler.per_task:,} examples per task "
        f"per epoch, {shown}); warmup {run.warmup_steps} steps")
    return run


def frozen_features(run):
    """With the whole backbone frozen for the whole run, the features of every example the run
    will read (features.py): the training rows of the epochs still to run, and this rank's
    validation and test batches. None otherwise, or with --no-feature-store."""
    args, place, progress = run.args, run.place, run.progress
    if not run.plan.backbone_fixed() or args.no_feature_store:
        return None
    wanted, epochs = {}, run.epochs_to_run
    if epochs:  # the rows these epochs draw, from where a resumed run stands
        for task, rows in run.sampler.reads(epochs.start, progress.batch, epochs.stop).items():
            wanted[(task, "train")] = (run.splits[task]["train"], rows)
    passes = (["valid"] if epochs else []) + (["test"] if run.ends_with_test else [])  # evaluations to come
    for split in passes:
        for task, by in run.splits.items():
            batches = length_batches(by[split].lengths(), run.eval_batch_size, place.rank, place.world_size)
            wanted[(task, split)] = (by[split], [i for batch in batches for i in batch])
    cache = None
    if not args.no_data_cache and args.feature_cache_limit_mb > 0:
        cache = DiskCache(Path(args.data) / ".cache" / "features", args.feature_cache_limit_mb, run.log)
    return FeatureStore.build(run.model, wanted, place, run.eval_batch_size, run.pad_id, run.pad_multiple,
                              args.feature_store_limit_mb, cache, run.log,
                              agree=lambda need: distributed.agree([need], run.control, place)[0])


# --- One epoch ---------------------------------------------------------------------------

class Meter:
    """Losses and examples since the last log line and since the epoch (re)started."""

    def __init__(self, place):
        self.place = place
        self.losses = {"ag": [], "ner": []}  # loss tensors, turned into numbers only when logging
        self.epoch_start = self.interval_start = time.perf_counter()
        self.epoch_examples = self.interval_examples = 0
        self.epoch_seconds = None

    def add(self, task, loss, examples):
        self.losses[task].append(loss)
        self.interval_examples += examples
        self.epoch_examples += examples

    def drain(self, progress):
        """The interval's losses as numbers, added to the epoch's running sum in progress.

        .tolist() waits for the GPU, so the loop calls this only when it logs or
        stops. With several ranks, each loss is the mean over ranks: the mean
        loss of the global batch (see task_loss).
        """
        losses = {task: distributed.mean(torch.stack(values), self.place).tolist()
                  for task, values in self.losses.items() if values}
        progress.loss_sum += sum(map(sum, losses.values()))
        progress.loss_count += sum(map(len, losses.values()))
        for values in self.losses.values():
            values.clear()
        return losses


def start_epoch(run, epoch):
    """Gradual unfreezing releases the next part at an epoch's start; then train mode."""
    frozen = run.plan.frozen_at(epoch)
    if run.plan.gradual and epoch > 0 and run.progress.batch == 0:
        released = freeze.release(run.model, run.optimizer, frozen, run.rates, run.args.weight_decay)
        run.runner.rebuild()  # DDP must know the new trainable parameters
        run.log(f"epoch {epoch + 1}: unfroze {len(released)} tensors\n{freeze.trainable_summary(run.model)}")
    freeze.set_train_mode(run.model, frozen, run.plan.num_layers)


def train_epoch(run, epoch, stop):
    """The epoch's steps, from where progress stands. Returns (meter, signal number or 0):
    a signal to any rank stops every rank after the same step."""
    start_epoch(run, epoch)
    batches = run.sampler.epoch(epoch)
    meter = Meter(run.place)
    signum = 0
    for b in range(run.progress.batch, len(batches)):
        task, global_batch = batches[b]
        loss = train_step(run, task, global_batch)
        run.progress.batch = b + 1
        meter.add(task, loss, len(global_batch))

        # termination and logging: every rank must stop (and log, a collective) at the same step, so
        # they agree after every step; rank 0's clock asks for a line at least every LOG_SECONDS
        due = run.place.rank == 0 and time.perf_counter() - meter.interval_start >= LOG_SECONDS
        signum, due = distributed.agree([stop.signal, int(due)], run.control, run.place)
        if run.progress.step % run.args.log_every == 0 or due or b + 1 == len(batches):
            log_interval(run, epoch, meter)
        if signum:
            break
    meter.epoch_seconds = time.perf_counter() - meter.epoch_start
    return meter, signum


LOG_SECONDS = 10.0  # the longest a run goes without a log line, whatever --log-every says


def log_interval(run, epoch, meter):
    """One log line: step, epoch, mean loss per task, learning rates, speed, ETA."""
    losses = meter.drain(run.progress)
    speed = meter.interval_examples / (time.perf_counter() - meter.interval_start)
    eta = seconds_left(run, speed)
    shown = " ".join(f"{t} {sum(losses[t]) / len(losses[t]):.4f}" if t in losses else f"{t} -" for t in meter.losses)
    skipped = f" | {run.progress.skipped_steps} skipped steps" if run.scaler.is_enabled() else ""
    run.log(f"step {run.progress.step}/{run.total_steps} | epoch {epoch + 1} | loss {shown} | "
            f"{current_rates(run.optimizer)} | {speed:.1f} samples/s | ETA {duration(eta)}{skipped}", flush=True)
    meter.interval_start, meter.interval_examples = time.perf_counter(), 0


def seconds_left(run, speed):
    """The run's ETA: the training steps left at `speed` (examples/s), then the evaluation passes
    still to come (one on validation per epoch, one on test) at the rate measured on the passes
    so far, or before the first one at 3x the training rate (a forward pass without backward)."""
    progress = run.progress
    size = {split: sum(len(by[split]) for by in run.splits.values()) for split in ("valid", "test")}
    to_evaluate = (run.args.epochs - len(progress.history)) * size["valid"] + size["test"]
    eval_rate = progress.eval_examples / progress.eval_seconds if progress.eval_examples else 3 * speed
    return (run.total_steps - progress.step) * run.sampler.batch_size / speed + to_evaluate / eval_rate


def current_rates(optimizer):
    """The learning rate now, of the top trained encoder group and of each head."""
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups if "no decay" not in g["name"]}
    encoder = [name for name in rates if name.startswith("layer.")]
    shown = [f"lr {rates[max(encoder, key=lambda n: int(n.split('.')[1]))]:.2e}"] if encoder else []
    shown += [f"{head} {rates[head]:.2e}" for head in ("cls_head", "ner_head") if head in rates]
    return " ".join(shown) or "lr -"


class StopSignal:
    """SIGINT / SIGTERM set .signal instead of killing the run; the loop then saves a checkpoint and exits."""

    def __init__(self):
        self.signal = 0


@contextlib.contextmanager
def stop_on_signals():
    stop = StopSignal()
    previous = {signum: signal.signal(signum, lambda received, _: setattr(stop, "signal", received))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- Saving, end of epoch, final test ---------------------------------------------------

def on_rank0(run, write, *args, **kwargs):
    """Every file a run writes goes through here: only rank 0 writes."""
    if run.place.rank == 0:
        write(*args, **kwargs)


def save_checkpoint(run):
    """Everything --resume needs. Every rank hands in its random state (a collective); rank 0 writes."""
    rngs = distributed.rng_states(run.place)
    on_rank0(run, checkpoint.save, checkpoint.path_in(run.out),
             Checkpoint(run.progress, run.model.state_dict(), run.optimizer.state_dict(), run.scaler.state_dict(),
                        rngs))


def stopped(run, epoch, meter, signum):
    """After a stop signal: save a checkpoint mid-epoch; returns the exit status, 128 + the signal number."""
    meter.drain(run.progress)
    run.progress.epoch = epoch
    run.progress.train_seconds += meter.epoch_seconds
    save_checkpoint(run)
    run.log(f"stopped by signal {signum} at step {run.progress.step}: checkpoint saved; "
            f"continue with --out {run.out} --resume", file=sys.stderr)
    return 128 + signum


def score_split(run, split):
    """evaluate() on the valid or test split with the run's batching (on stored features with a
    frozen backbone), timed into progress.eval_seconds."""
    start = time.perf_counter()
    ag, ner = run.splits["ag"][split], run.splits["ner"][split]
    metrics = evaluate(run.model, ag, ner, run.place, run.eval_batch_size, run.pad_id, run.pad_multiple,
                       features=run.features and run.features.of(split), log=run.log, what=split)
    run.progress.eval_seconds += time.perf_counter() - start
    run.progress.eval_examples += len(ag) + len(ner)
    return metrics


def end_of_epoch(run, epoch, meter):
    """Evaluate on validation, keep the best model, save a checkpoint."""
    args, progress = run.args, run.progress
    progress.train_seconds += meter.epoch_seconds
    metrics = score_split(run, "valid")
    record = {"epoch": epoch + 1, "step": progress.step, "split": "valid",
              **{k: metrics[k] for k in ("ag_accuracy", "ner_f1", "ner_precision", "ner_recall")},
              "train_loss": progress.loss_sum / max(progress.loss_count, 1),
              "elapsed_s": round(time.perf_counter() - run.started, 1),
              "samples_per_s": round(meter.epoch_examples / meter.epoch_seconds, 1)}
    progress.loss_sum, progress.loss_count = 0.0, 0
    run.log(f"epoch {epoch + 1} valid: AG accuracy {metrics['ag_accuracy']:.4f} | NER F1 {metrics['ner_f1']:.4f} "
            f"(P {metrics['ner_precision']:.4f} R {metrics['ner_recall']:.4f})")
    progress.history.append(record)
    on_rank0(run, write_json, run.out / "metrics.jsonl", progress.history, lines=True)
    score = (metrics["ag_accuracy"] + metrics["ner_f1"]) / 2
    if progress.best is None or score > progress.best["score"]:
        progress.best = {"score": score, "epoch": epoch + 1}
        run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        on_rank0(run, save_multitask, run.model, run.out, extra={"run": vars(args)})
        run.log(f"  best so far: saved {run.out / 'model.safetensors'}")
    progress.epoch, progress.batch = epoch + 1, 0
    save_checkpoint(run)


def final_test(run):
    """The best model by validation, evaluated on test; writes summary.json."""
    model, progress = run.model, run.progress
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if progress.best is None:  # nothing trained: keep the model as it is
        on_rank0(run, save_multitask, model, run.out, extra={"run": vars(run.args)})
    elif run.best_weights is not None:
        model.load_state_dict(run.best_weights)
    else:  # resumed after the best epoch: its weights are on disk (every rank must see OUT)
        model.load_state_dict(load_multitask(run.out).state_dict())
    test = score_split(run, "test")
    run.log(f"test: AG accuracy {test['ag_accuracy']:.4f} | NER F1 {test['ner_f1']:.4f} "
            f"(P {test['ner_precision']:.4f} R {test['ner_recall']:.4f})")
    summary = {"split": "test", **test, "best_epoch": progress.best and progress.best["epoch"],
               "config": vars(run.args), "device": str(run.place.device),
               "precision": PRECISION_NAMES[run.place.amp_dtype],
               "timings_s": {"data": round(run.data_seconds, 2), "train": round(progress.train_seconds, 2),
                             "eval": round(progress.eval_seconds, 2),
                             "total": round(time.perf_counter() - run.started, 2)},
               "parameters": parameters, "skipped_steps": progress.skipped_steps,
               "feature_store": run.features and run.features.stats,
               "peak_memory_mb": round(run.place.peak_memory_mb(), 1)}
    on_rank0(run, write_json, run.out / "summary.json", summary)
    run.log(f"wrote {run.out / 'summary.json'}, {run.out / 'metrics.jsonl'}, {run.out / 'model.safetensors'}")


# --- The whole run -------------------------------------------------------------------------

def run_training(args):
    """set_up, then each epoch and its end, then the final test; returns the exit status."""
    try:
        run = set_up(args)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    epochs, ends_with_test = run.epochs_to_run, run.ends_with_test  # before progress moves on
    with stop_on_signals() as stop:
        for epoch in epochs:
            meter, signum = train_epoch(run, epoch, stop)
            if signum:
                return stopped(run, epoch, meter, signum)
            end_of_epoch(run, epoch, meter)
    if not ends_with_test:
        run.log(f"stopping after epoch {epochs.stop} (--stop-after); continue with --out {run.out} --resume")
        return 0
    final_test(run)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run_training(args)
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
