"""Train the multi-task model (Task 2): AG News topics and CoNLL-2003 entities on one encoder.

    python train.py --pool max --freeze backbone
    python train.py --model DIR --data DIR --epochs 3 --amp bf16 --out runs/NAME
    python train.py --out runs/NAME --resume          # continue an interrupted run
    python predict.py --model runs/NAME "Apple opened a store in London."   # then use it

Reading order: the flags; task_loss and evaluate, what the two tasks are
scored by; MultiTask, the job this script gives the loop (loop.py: the
step, the epochs, checkpoints, the final test); set_up, which reads the
data, builds the model and returns the loop's Run. Freezing lives in
freeze.py, a frozen backbone's features in features.py, learning rates in
lr.py, the checkpoint in checkpoint.py, the collectives of a torchrun job in
distributed.py, and the device and precision in runtime.py. What a run
writes to --out is listed in README.md.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import distributed
import freeze
import loop
from data import (AG_CLASSES, AG_VALID_FRACTION, IGNORE_INDEX, NER_TAGS, MultiTaskSampler, batches_by_length,
                  check_fits, collate, copy_tokenizer, length_batches, limit_split, load_splits, load_tokenizer,
                  word_tags)
from features import DiskCache, FeatureStore
from lr import part_rates
from metrics import entity_counts, scores_from_counts
from model import (NORMS, POOLS, MultiTaskModel, load_multitask, load_pretrained, pooling_note,
                   save_multitask)
from runtime import PRECISION_NAMES, Place, Report, UsageError, pick_amp


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
    g.add_argument("--head-dropout", type=float, default=0.1, help="dropout before each head")
    g = p.add_argument_group("freezing (Task 3)")
    loop.add_freeze_flags(g, "none | all | backbone | embeddings | lower:N | cls-head | ner-head")
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
    loop.add_rate_flags(g)
    g.add_argument("--cls-lr", type=float, default=None, help="learning rate of the classification head")
    g.add_argument("--ner-lr", type=float, default=None, help="learning rate of the NER head")
    g = p.add_argument_group("run")
    loop.add_run_flags(g)
    g.add_argument("--loss-norm", choices=("batch", "fixed"), default="batch",
                   help="what divides a batch's summed loss: batch: its own label count (the mean); fixed: the "
                        "label count of an average batch of the task, so that every labelled word weighs the "
                        "same in short and long batches")
    g.add_argument("--ag-valid-fraction", type=float, default=AG_VALID_FRACTION,
                   help="share of AG News train held out as its validation split (fixed rows; a larger share "
                        "holds out a superset); with fewer AG rows left, every epoch is shorter for both tasks")
    g.add_argument("--group-window", type=int, default=50,
                   help="sort by length inside windows of this many batches to cut padding (0: off)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder; batches are then padded to a multiple of 8 tokens, "
                        "so that only a few shapes are compiled")
    return p.parse_args(argv)


def check_args(args):
    """Flag problems a parser cannot see; raises UsageError naming the flag."""
    loop.check_flags(args, rates=("cls_lr", "ner_lr"),
                     at_least=(("embed_dim", 1), ("group_window", 0), ("feature_store_limit_mb", 0),
                               ("feature_cache_limit_mb", 0)))
    if not 0 <= args.head_dropout < 1:
        raise UsageError(f"argument --head-dropout: must be in [0, 1), got {args.head_dropout}")
    if not 0 < args.ag_valid_fraction < 1:
        raise UsageError(f"argument --ag-valid-fraction: must be in (0, 1), got {args.ag_valid_fraction}")


# --- The loss and evaluation ----------------------------------------------------------

def task_loss(logits, labels, task, normalizer=None):
    """Cross-entropy in fp32 over examples (ag) or first word pieces (ner).

    The mean, or with a normalizer the sum divided by it. Data-parallel runs
    pass (labels in the global batch) / (number of ranks): DDP averages the
    ranks' gradients, and that average is then the gradient of the mean over
    the global batch, however the labels fall between ranks. With
    --loss-norm fixed the divisor is the same for every batch of a task (the
    labels of an average global batch), so every word piece weighs the same
    in every batch: batches grouped by length then weigh as random ones do,
    where a per-batch mean would give a batch of 3-word lines as much weight
    as a batch of 40-word sentences (docs/defaults.md).
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


# --- The job the loop runs ------------------------------------------------------------------

class MultiTask:
    """AG News and CoNLL-2003 on one encoder: what loop.py needs to train and score them."""
    tasks = ("ag", "ner")
    final_splits = ("test",)

    def __init__(self, args, model, splits, place, rates, pad_id):
        self.model, self.splits, self.place, self.rates = model, splits, place, rates
        self.pad_id, self.pad_multiple = pad_id, 8 if args.compile else 1  # [PAD], or RoBERTa's <pad>
        self.eval_batch_size = 2 * args.batch_size  # no activations are kept for backward
        train = {task: by["train"] for task, by in splits.items()}
        self.sampler = MultiTaskSampler({t: part.lengths() for t, part in train.items()}, args.batch_size,
                                        args.seed, args.group_window, place.rank, place.world_size)
        self.batch_size = self.sampler.batch_size
        self.n_labels = {task: label_counts(part) for task, part in train.items()}  # task_loss's normalizer
        self.loss_norm = args.loss_norm
        # --loss-norm fixed: one divisor per task, the labels an average global batch holds
        self.fixed_norm = {task: self.batch_size * float(counts.mean()) for task, counts in self.n_labels.items()}
        self.features = None  # a frozen backbone's features of every example the run reads (set_up)
        self.runner = None  # what a step calls: freeze.Runner, once the features are known (set_up)

    def epoch(self, epoch):
        return self.sampler.epoch(epoch)

    def loss(self, task, global_batch):
        indices = self.sampler.share(global_batch)  # this rank's part of the global batch
        batch = self.place.to_device(collate(self.splits[task]["train"], indices, self.pad_id, self.pad_multiple))
        with self.place.autocast():  # the model, or only its heads on stored features (freeze.Runner)
            logits = self.runner(task, batch, indices)
        if self.loss_norm == "fixed":
            normalizer = self.fixed_norm[task] / self.place.world_size
        else:
            normalizer = float(self.n_labels[task][global_batch].sum()) / self.place.world_size
        return task_loss(logits, batch["labels"], task, normalizer)

    def evaluate(self, split, log):
        """evaluate() on a split with the run's batching (on stored features with a frozen backbone)."""
        return evaluate(self.model, self.splits["ag"][split], self.splits["ner"][split], self.place,
                        self.eval_batch_size, self.pad_id, self.pad_multiple,
                        features=self.features and self.features.of(split), log=log, what=split)

    def size(self, split):
        return sum(len(by[split]) for by in self.splits.values())

    def sources(self):
        """Every split's fingerprint (its file's bytes, the tokenizer, max_len): what the checkpoint pins."""
        return {f"{task}/{split}": part.source for task, by in self.splits.items() for split, part in by.items()}

    def record(self, metrics):
        return {k: metrics[k] for k in ("ag_accuracy", "ner_f1", "ner_precision", "ner_recall")}

    def describe(self, metrics):
        return (f"AG accuracy {metrics['ag_accuracy']:.4f} | NER F1 {metrics['ner_f1']:.4f} "
                f"(P {metrics['ner_precision']:.4f} R {metrics['ner_recall']:.4f})")

    def score(self, metrics):
        return (metrics["ag_accuracy"] + metrics["ner_f1"]) / 2

    def summary(self, results):
        return {"split": "test", **results["test"], "feature_store": self.features and self.features.stats}

    def save(self, out, extra):
        save_multitask(self.model, out, extra=extra)

    def saved(self, out):
        return load_multitask(out).state_dict()

    def rebuild(self):
        self.runner.rebuild()


# --- Set-up ----------------------------------------------------------------------------

def base_rates(args, num_layers):
    """part -> base learning rate, from the flags of Task 4 (lr.part_rates)."""
    return part_rates(num_layers, args.lr, args.lr_decay, args.head_lr, args.cls_lr, args.ner_lr)


def open_inputs(args):
    """Check and read everything a run starts from; any problem raises a one-line error.

    Returns (place, bert, plan, out, saved checkpoint or None, splits).
    """
    check_args(args)
    rank, world_size, device = distributed.init(args.device)
    place = Place(device, pick_amp(args.amp, device), rank, world_size)
    tokenizer = load_tokenizer(args.model)
    bert = load_pretrained(args.model)
    check_fits(tokenizer, bert.config, args.max_len, args.model)
    if (note := loop.resolve_auto_rates(args, bert.config)) and rank == 0:
        print(note)  # before open_out, so that the run records (and --resume compares) the numbers
    widest = -(-args.max_len // 8) * 8  # --compile pads to a multiple of 8
    if args.compile and widest > bert.config.max_len:
        raise UsageError(f"argument --compile: --max-len {args.max_len} pads up to {widest} tokens, more than "
                         f"the model's {bert.config.max_len} positions")
    plan = loop.freeze_plan(args, bert.config)
    out, saved = loop.open_out(args, world_size, rank)
    data_cache = None if args.no_data_cache else Path(args.data) / ".cache"
    splits = load_splits(args.data, tokenizer, args.max_len, cache_dir=data_cache, log=print if rank == 0 else None,
                         ag_valid_fraction=args.ag_valid_fraction)
    return place, bert, plan, out, saved, splits


def build_model(args, bert, plan, place, log):
    """The two-head model, frozen as the plan says for epoch 0."""
    model = MultiTaskModel(bert, args.pool, args.embed_dim, args.normalize, n_classes=len(AG_CLASSES),
                           n_tags=len(NER_TAGS), head_dropout=args.head_dropout).to(place.device)
    if note := pooling_note(bert.config, args.pool):
        log(note)
    freeze.apply_freeze(model, plan.frozen_at(0))
    log(f"parameters (--freeze {args.freeze}{', --unfreeze gradual' if plan.gradual else ''}):")
    log(freeze.trainable_summary(model))
    log(f"device {place.device}, {PRECISION_NAMES[place.amp_dtype]}{distributed.describe(place)}"
        + (", torch.compile on the encoder" if args.compile else ""))
    if args.compile:
        model.bert.compile()  # in place: parameter names, checkpoints and model.features stay as they are
    return model


def set_up(args):
    """Everything the loop needs, as a loop.Run."""
    started = time.perf_counter()
    place, bert, plan, out, saved, splits = open_inputs(args)
    log = print if place.rank == 0 else (lambda *_, **__: None)  # only rank 0 speaks, and only rank 0 writes
    torch.manual_seed(args.seed)  # the same initial heads on every rank
    splits = {task: {s: limit_split(part, args.limit) for s, part in by.items()} for task, by in splits.items()}
    data_seconds = time.perf_counter() - started
    for task, by in splits.items():
        log(f"{task}: " + ", ".join(f"{s} {len(p):,} ({sum(p.truncated)} truncated)" for s, p in by.items()))

    model = build_model(args, bert, plan, place, log)
    job = MultiTask(args, model, splits, place, base_rates(args, plan.num_layers), bert.config.pad_token_id)
    run = loop.start(args, job, plan, place, out, saved, log, started, data_seconds)
    loop.on_rank0(run, copy_tokenizer, args.model, out)  # so that OUT is a complete model folder (predict.py)
    job.features = frozen_features(run)
    job.runner = freeze.Runner(model, place, job.features and job.features.of("train"))
    if not plan.trains(args.epochs):
        log(f"--freeze {args.freeze}: nothing trains; evaluating the model as it is, on the test split only")
        return run
    shown = (f"global batch {job.batch_size} = {args.batch_size} per rank x {place.world_size} ranks"
             if place.world_size > 1 else f"batch {args.batch_size}")
    log(f"training: {args.epochs} epochs x {run.steps_per_epoch} steps ({job.sampler.per_task:,} examples per task "
        f"per epoch, {shown}); warmup {run.warmup_steps} steps")
    return run


def frozen_features(run):
    """With the whole backbone frozen for the whole run, the features of every example the run
    will read (features.py): the training rows of the epochs still to run, and this rank's
    validation and test batches. None otherwise, or with --no-feature-store."""
    args, place, progress, job = run.args, run.place, run.progress, run.job
    if not run.plan.backbone_fixed() or args.no_feature_store:
        return None
    wanted, epochs = {}, run.epochs_to_run
    if epochs:  # the rows these epochs draw, from where a resumed run stands
        for task, rows in job.sampler.reads(epochs.start, progress.batch, epochs.stop).items():
            wanted[(task, "train")] = (job.splits[task]["train"], rows)
    passes = (["valid"] if epochs else []) + (["test"] if run.ends_with_test else [])  # evaluations to come
    for split in passes:
        for task, by in job.splits.items():
            batches = length_batches(by[split].lengths(), job.eval_batch_size, place.rank, place.world_size)
            wanted[(task, split)] = (by[split], [i for batch in batches for i in batch])
    cache = None
    if not args.no_data_cache and args.feature_cache_limit_mb > 0:
        cache = DiskCache(Path(args.data) / ".cache" / "features", args.feature_cache_limit_mb, run.log)
    return FeatureStore.build(run.model, wanted, place, job.eval_batch_size, job.pad_id, job.pad_multiple,
                              args.feature_store_limit_mb, cache, run.log,
                              agree=lambda need: distributed.agree([need], run.control, place)[0])


# --- The whole run -------------------------------------------------------------------------

def main(argv=None):
    """The whole run (loop.run_script: set_up, each epoch and its end, the final test); the exit status."""
    return loop.run_script(set_up, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
