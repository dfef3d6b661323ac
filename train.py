"""Train the multi-task model (Task 2): the tasks of --tasks (AG News, CoNLL-2003) on one encoder.

    python train.py --pool max --freeze backbone
    python train.py --tasks ag,ner,pos           # a third task; your own: --tasks ag,ner,mine.json
    python train.py --model DIR --data DIR --epochs 3 --amp bf16 --out runs/NAME
    python train.py --out runs/NAME --resume     # continue an interrupted run
    python predict.py --model runs/NAME "Apple opened a store in London."   # then use it

Reading order: the flags; task_loss and evaluate; set_up (data, model, optimizer); train, the
loop: for each epoch, for each batch, forward, loss, backward, optimizer step, and at each epoch's
end evaluate, keep the best, checkpoint; test; main. The rest is one-line calls: freeze.py and
lr.py (Tasks 3 and 4), and support/, the operational code (support/features.py: a frozen backbone's
outputs; support/run_folder.py: the --out folder and signals; step_log, checkpoint, distributed for
torchrun, runtime). Only rank 0 prints and writes the run folder (docs/multitask.md lists it).
"""

from support import cpu_threads  # noqa: F401  first: before torch starts, how its CPU threads wait

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from support import checkpoint
from support import distributed
from support import flags
import freeze
from support import run_folder
from support.checkpoint import Progress
from data import (IGNORE_INDEX, Batching, MultiTaskSampler, collate, length_batches,
                  limit_split, load_splits, load_tokenizer, word_tags)
from support.features import DiskCache, FeatureStore, rows_wanted
from lr import adamw, format_groups, lr_factor, param_groups, part_rates
from support.metrics import describe, main_score, task_counts, task_scores
from model import NORMS, POOLS, MultiTaskModel, SentenceEncoder
from support.model_folder import check_fits, load_pretrained, pooling_note
from support.runtime import (HelpFormatter, Place, Report, UsageError, describe_precision, log,
                             optimizer_step)
from support.step_log import StepLog, Work, log_plan, warn_if_long
from support.task_files import parse_tasks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune BERT on several tasks at once (AG News and "
                                "CoNLL-2003 by default).", formatter_class=HelpFormatter)
    p.add_argument("--data", default="data", help="data folder written by download.py, where the "
                   "built-in tasks' files are (ag_news/*.csv, conll2003/*.txt)")
    p.add_argument("--tasks", default="ag,ner", help="built-in tasks (ag, ner, pos, chunk) and "
                   "task files (.json, docs/own-task.md), comma-separated: a head each")
    p.add_argument("--model", help="pretrained BERT folder (default: DATA/bert-base-uncased)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<date>-<time>)")
    g = p.add_argument_group("model")
    g.add_argument("--pool", choices=POOLS, help="sentence pooling for the classification head "
                   "(default: the --model folder's, where sentence-transformers saved it; else "
                   "mean)")
    g.add_argument("--embed-dim", type=int, help="project the sentence embedding to this size")
    g.add_argument("--normalize", choices=NORMS, default="none", help="normalize the embedding")
    g.add_argument("--head-dropout", type=float, default=0.1, help="dropout before each head")
    g = p.add_argument_group("freezing (Task 3)")
    flags.add_freeze_flags(g, "none | all | backbone | embeddings | lower:N | NAME-head (a task's "
                              "head, e.g. ner-head; cls-head: the sentence-level heads)")
    flags.add_feature_store_flags(g)  # a frozen backbone's outputs, computed once (features.py)
    g = p.add_argument_group("learning rates (Task 4)")
    flags.add_rate_flags(g)
    g.add_argument("--task-lr", type=flags.task_values, default={}, metavar="NAME=LR,...",
                   help="learning rate of a task's head, e.g. pos=5e-4 (else --cls-lr, --ner-lr, "
                   "--head-lr)")
    g.add_argument("--cls-lr", type=float, help="learning rate of sentence-level heads (AG's)")
    g.add_argument("--ner-lr", type=float, help="learning rate of word-level heads (NER's)")
    g = p.add_argument_group("run")
    flags.add_run_flags(g)
    flags.add_multitask_flags(g)  # --sampling, --loss-weight, --loss-norm, --group-window, ...
    return flags.parse(p, argv)  # with --resume, the saved run's flags are the defaults


def check_args(args):
    """Flag problems a parser cannot see; raises UsageError naming the flag."""
    at_least = (("embed_dim", 1), ("group_window", 0), ("feature_store_limit_mb", 0),
                ("feature_cache_limit_mb", 0))
    flags.check_flags(args, rates=("cls_lr", "ner_lr"), at_least=at_least)
    if not 0 <= args.head_dropout < 1:
        raise UsageError(f"argument --head-dropout: must be in [0, 1), got {args.head_dropout}")
    if not 0 < args.valid_fraction < 1:
        raise UsageError(f"argument --valid-fraction: must be in (0, 1), got {args.valid_fraction}")
    flags.check_sampling(args.sampling)
    tasks = parse_tasks(args.tasks)
    for flag in ("task_lr", "loss_weight"):
        flags.check_task_values(flag, getattr(args, flag), [t.name for t in tasks])
    return tasks


# --- The loss and evaluation ----------------------------------------------------------

def task_loss(logits, labels, level, normalizer=None):
    """Cross-entropy in fp32 over examples (sentence level) or first word pieces (word level): the
    mean, or the sum divided by normalizer. Data-parallel runs pass (labels in the global batch) /
    (ranks): DDP averages the ranks' gradients, which is then the gradient of the global batch's
    mean however its labels fall between ranks. --loss-norm fixed divides every batch of a task by
    the labels of an average batch, so every word piece weighs the same in short and long batches
    (docs/defaults.md)."""
    logits = logits.float()
    if level == "word":
        logits, labels = logits.flatten(0, 1), labels.flatten()
    if normalizer is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / normalizer


def label_counts(part):
    """Per example, how many labels its loss counts: 1 (sentence level), or its labelled pieces."""
    if part.task.level == "sentence":
        return np.ones(len(part), dtype=np.int64)
    counted = [sum(label != IGNORE_INDEX for label in labels) for labels in part.labels]
    return np.array(counted, dtype=np.int64)


@torch.no_grad()
def evaluate(model, data, place, batching, features=None, what="evaluation"):
    """Every task's scores on one split, by its metric (metrics.task_scores); data: {task: TaskData}

    features: {task: features.Features} of this split, from a frozen backbone;
    then only the heads run. With several ranks, batch b goes to rank b %
    world_size, and the counts behind the scores are summed over ranks:
    every rank gets exactly the scores of a single process. what: the
    split's name, for the progress line of a long pass.
    """
    model.eval()
    cost = sum(len(ids) for part in data.values() for ids in part.input_ids)  # in word pieces
    report = Report(f"{what} pass", sum(map(len, data.values())), total_cost=cost)
    counts = []  # every task's counts, in one list for one sum over ranks
    for task, part in data.items():
        predicted = {}  # example index -> argmax per row: a label, or a tag per piece
        for indices in length_batches(part.lengths(), batching.size, place.rank, place.world_size):
            batch = place.to_device(collate(part, indices, batching.pad_id, batching.multiple))
            with place.autocast():
                stored = features and features[task].batch(indices, batch["input_ids"].shape[1])
                logits = model(batch["input_ids"], batch["attention_mask"], task, stored)
            predicted.update(zip(indices, logits.argmax(-1).tolist()))
            pieces = sum(len(part.input_ids[i]) for i in indices)  # this rank's; times the ranks:
            report.update(len(indices) * place.world_size, pieces * place.world_size)  # about all
        if part.task.level == "word":  # one tag per word, from each word's first piece
            gold = [part.word_tags[i] for i in predicted]
            predicted = {i: word_tags(p, part.first_piece[i], part.task.labels)
                         for i, p in predicted.items()}
        else:
            gold = [part.labels[i] for i in predicted]
        counts.append(task_counts(part.task, gold, list(predicted.values())))
    summed, metrics = distributed.sum_counts([n for c in counts for n in c], place), {}
    for part, mine in zip(data.values(), counts):
        metrics |= task_scores(part.task, summed[:len(mine)])
        summed = summed[len(mine):]
    return metrics


# --- Set-up ----------------------------------------------------------------------------

@dataclass
class Setup:
    """What set_up builds: everything the loop reads, and `progress`, which it moves on."""
    args: argparse.Namespace  # the flags, with --lr and --lr-decay auto resolved
    place: Place  # device, autocast dtype, and this process's rank of world_size
    folder: run_folder.RunFolder  # where rank 0 writes metrics, the best model, the checkpoint
    model: MultiTaskModel
    splits: dict  # {task: {split: TaskData}}
    sampler: MultiTaskSampler  # which examples form each training batch, epoch by epoch
    plan: freeze.Plan  # the frozen parts of every epoch
    rates: dict  # part -> base learning rate (lr.part_rates)
    optimizer: torch.optim.Optimizer  # AdamW over lr.py's groups
    scaler: torch.amp.GradScaler  # loss scaling, on only for fp16
    progress: Progress  # where the run stands: every checkpoint saves it
    fingerprint: dict  # the data and pretrained model the run is made from (checkpoint.fingerprint)
    started: float  # time.perf_counter() when this invocation started
    data_seconds: float  # of which reading and tokenizing
    best_weights: dict = None  # the best epoch's weights, kept in memory on every rank

    @property
    def batching(self):
        """Evaluation batches: twice the training size (no activations kept); under --compile,
        widths of 8k."""
        multiple = 8 if self.args.compile else 1
        return Batching(2 * self.args.batch_size, self.model.bert.config.pad_token_id, multiple)


def set_up(args):
    """Check the flags; read the model and the data; build the model, its optimizer and the
    sampler; with --resume, restore all of it from the checkpoint. Returns the Setup."""
    started = time.perf_counter()
    tasks = check_args(args)  # rows of the task table (support/tasks.py)
    place = distributed.init(args.device, args.amp)  # under torchrun, after joining the group
    tokenizer, bert = load_tokenizer(args.model), load_pretrained(args.model, new_heads=True)
    check_fits(tokenizer, bert.config, args.max_len, args.model)
    # --lr auto; --pool from a sentence-transformers folder. Before the run folder records the
    # flags, so that --resume compares the resolved values.
    if note := flags.resolve_defaults(args, bert.config)[0]:
        log(note)
    flags.check_compile(args, bert.config)
    plan = flags.freeze_plan(args, bert.config, tasks)
    folder, saved = run_folder.claim(args, place)  # with --resume, the checkpoint read and checked
    cache = None if args.no_data_cache else Path(args.data) / ".cache"
    tasks = [replace(task, valid_fraction=args.valid_fraction) for task in tasks]
    splits = load_splits(args.data, tokenizer, args.max_len, cache, tasks=tasks)
    tasks = [by["train"].task for by in splits.values()]  # with their labels
    torch.manual_seed(args.seed)  # the same initial heads on every rank
    splits = {task: {name: limit_split(part, args.limit) for name, part in by.items()}
              for task, by in splits.items()}
    data_seconds = time.perf_counter() - started
    for task, by in splits.items():
        shown = [f"{split} {len(p):,} ({sum(p.truncated)} truncated)" for split, p in by.items()]
        log(f"{task}: " + ", ".join(shown))
    model = build_model(args, bert, tasks, plan, place)
    lengths = {task: by["train"].lengths() for task, by in splits.items()}
    sampling = f"annealed:{args.epochs}" if args.sampling == "annealed" else args.sampling
    sampler = MultiTaskSampler(lengths, args.batch_size, args.seed, args.group_window,
                               (place.rank, place.world_size), sampling)

    # The optimizer holds what trains in epoch 0, one group per part and rate (lr.py).
    rates = base_rates(args, plan.num_layers, tasks)
    groups = param_groups(model, rates, args.weight_decay)
    optimizer = adamw(groups, place.device)
    if plan.trains(args.epochs):
        log("optimizer groups:\n" + format_groups(groups))
    for epoch in range(1, checkpoint.epochs_begun(saved)) if plan.gradual else ():  # --resume:
        freeze.release(model, optimizer, plan.frozen_at(epoch), rates, args.weight_decay)  # groups
    sources = {f"{task}/{split}": part.source for task, by in splits.items()
               for split, part in by.items()}
    scaler, progress, fingerprint = checkpoint.start(args, place, model, optimizer, sources, saved)
    return Setup(args, place, folder, model, splits, sampler, plan, rates, optimizer, scaler,
                 progress, fingerprint, started, data_seconds)


def base_rates(args, num_layers, tasks):
    """part -> base learning rate, from the flags of Task 4 (lr.part_rates): a head's --task-lr,
    else its level's (--cls-lr at sentence level, --ner-lr at word level), else --head-lr. The
    sentence projection, shared by the sentence-level heads, takes --head-lr."""
    by_level = {"sentence": args.cls_lr, "word": args.ner_lr}
    level_rate = {level: args.head_lr if rate is None else rate for level, rate in by_level.items()}
    heads = {f"{t.name}_head": args.task_lr.get(t.name, level_rate[t.level]) for t in tasks}
    return part_rates(num_layers, args.lr, args.lr_decay, heads | {"project": args.head_lr})


def build_model(args, bert, tasks, plan, place):
    """The model with a head per task, on the device, frozen as the plan says for epoch 0, compiled
    with --compile."""
    bert.unpad = args.unpad  # which batches compute only their real tokens (model.Packing)
    encoder = SentenceEncoder(bert, args.pool, args.embed_dim, args.normalize)  # Task 1's, shared
    model = MultiTaskModel(encoder, tasks, args.head_dropout).to(place.device)
    if note := pooling_note(bert.config, args.pool):
        log(note)
    freeze.apply_freeze(model, plan.frozen_at(0))
    log(f"parameters (--freeze {args.freeze}{', --unfreeze gradual' if plan.gradual else ''}):")
    log(freeze.trainable_summary(model))
    log(f"device {place.device}, {describe_precision(place, args.amp)}{distributed.describe(place)}"
        + (", torch.compile on the encoder" if args.compile else ""))
    if args.compile:
        model.bert.compile()  # in place: parameter names, checkpoints, model.features stay
    return model


# --- The loop ---------------------------------------------------------------------------

def train(s):
    """The run: for each epoch, for each batch: forward, loss, backward, optimizer step, log; at the
    epoch's end: evaluate, keep the best, checkpoint; then test. Returns the exit status."""
    args, model, place, progress, sampler = s.args, s.model, s.place, s.progress, s.sampler
    optimizer, scaler, folder, data, plan = s.optimizer, s.scaler, s.folder, s.splits, s.plan
    epochs = run_folder.epochs_to_run(progress, args) if plan.trains(args.epochs) else range(0)
    steps_per_epoch = [len(sampler.epoch(e)) for e in range(args.epochs)]  # annealed: they vary
    total_steps, tasks = sum(steps_per_epoch), list(data)
    warmup_steps = int(args.warmup * total_steps)
    n_labels = {task: label_counts(by["train"]) for task, by in data.items()}  # what a loss counts
    fixed_norm = {task: sampler.batch_size * float(n.mean()) for task, n in n_labels.items()}
    log_plan(args, sampler, steps_per_epoch, warmup_steps, plan.trains(args.epochs))
    warn_if_long(model, sampler, data, epochs, plan.backbone_fixed(), place.device)
    features = frozen_features(s, epochs)  # a backbone frozen all run: its outputs, once; else None
    ddp, trains = distributed.wrap(model, place), {t: freeze.task_trains(model, t) for t in tasks}
    evaluated = [sum(len(by[split]) for by in data.values()) for split in ("valid", "test")]
    steps = StepLog(tasks, place, args.log_every, scaler,
                    Work(total_steps, sampler.batch_size, args.epochs, *evaluated))
    pad_id, multiple = s.batching.pad_id, s.batching.multiple
    with run_folder.StopSignals() as stop:  # SIGINT, SIGTERM: the step ends, a checkpoint is saved
        for epoch in epochs:
            if plan.gradual and epoch > 0 and progress.batch == 0:  # gradual unfreezing: one more
                frozen = plan.frozen_at(epoch)  # layer; DDP fixes its parameters when it is built
                released = freeze.release(model, optimizer, frozen, s.rates, args.weight_decay)
                ddp = distributed.wrap(model, place)
                trains = {t: freeze.task_trains(model, t) for t in tasks}
                log(f"epoch {epoch + 1}: unfroze {len(released)} tensors\n"
                    + freeze.trainable_summary(model))
            freeze.set_train_mode(model, plan.frozen_at(epoch))
            batches = sampler.epoch(epoch)  # [(task, example indices)]: one task per batch
            steps.start_epoch(len(batches))
            for b in range(progress.batch, len(batches)):
                task, global_batch = batches[b]
                indices = sampler.share(global_batch)  # this rank's part of the global batch
                batch = place.to_device(collate(data[task]["train"], indices, pad_id, multiple))
                factor = lr_factor(progress.step, total_steps, warmup_steps)  # warmup, then decay
                for group in optimizer.param_groups:  # each part's rate (lr.py) x the schedule
                    group["lr"] = group["base_lr"] * factor
                net = ddp if trains[task] else model  # DDP would wait for a frozen task's gradients
                ids, mask = batch["input_ids"], batch["attention_mask"]
                with place.autocast():  # the forward; a frozen backbone's outputs are in the store
                    stored = features and features.batch("train", task, indices, ids.shape[1])
                    logits = net(ids, mask, task, stored)
                counted = float(n_labels[task][global_batch].sum())  # labels the loss counts
                divisor = fixed_norm[task] if args.loss_norm == "fixed" else counted
                level = model.tasks[task].level
                loss = task_loss(logits, batch["labels"], level, divisor / place.world_size)  # fp32
                if loss.requires_grad:  # False when all of this task's path is frozen
                    scaler.scale(loss * args.loss_weight.get(task, 1.0)).backward()  # --loss-weight
                    progress.skipped_steps += optimizer_step(optimizer, scaler, args.clip)
                progress.step, progress.batch = progress.step + 1, b + 1
                steps.add(task, loss.detach(), len(global_batch))  # a signal? a log line? NaN?
                if signum := steps.after_step(progress, stop.signum, optimizer):
                    progress.train_seconds += steps.stop(progress)  # save a checkpoint, stop
                    folder.save_checkpoint(progress, model, optimizer, scaler, s.fingerprint)
                    return run_folder.stopped(signum, folder.path, f"at step {progress.step}")

            # The epoch's end: evaluate on validation, keep the best model, save a checkpoint.
            progress.train_seconds += steps.end_epoch()
            metrics = evaluate_split(s, "valid", features)
            scores = {k: v for k, v in metrics.items() if not k.endswith("_per_type")}
            record = steps.epoch_record(progress, time.perf_counter() - s.started)
            progress.history.append({"epoch": epoch + 1, "step": progress.step, "split": "valid",
                                     **scores, **record})
            folder.write_json("metrics.jsonl", progress.history, lines=True)
            log(f"epoch {epoch + 1} valid: {describe(metrics, tasks)}")
            score = sum(main_score(metrics, task) for task in tasks) / len(tasks)  # the tasks' mean
            if progress.best is None or score > progress.best["score"]:
                progress.best = {"score": score, "epoch": epoch + 1}
                s.best_weights = {k: v.detach().to("cpu", copy=True)
                                  for k, v in model.state_dict().items()}
                folder.save_model(model)
                log(f"  best so far: saved {folder.path / 'model.safetensors'}")
            progress.epoch, progress.batch = epoch + 1, 0
            folder.save_checkpoint(progress, model, optimizer, scaler, s.fingerprint)  # --resume
            if signum := distributed.agree([stop.signum], place)[0]:  # in evaluation or saving
                return run_folder.stopped(signum, folder.path, f"after epoch {epoch + 1}")
    if epochs and epochs.stop < args.epochs:  # --stop-after
        return run_folder.paused(epochs.stop, folder.path)
    return evaluate_best(s, features)


def frozen_features(s, epochs):
    """A backbone frozen all run is a fixed function: its outputs for every example the run reads
    (the train rows its epochs draw, valid, test), computed once (features.py). None when it trains,
    with --no-feature-store, or where they would not fit in memory. epochs: those run now."""
    args = s.args
    if not s.plan.backbone_fixed() or args.no_feature_store:
        return None
    drawn = s.sampler.reads(epochs.start, s.progress.batch, epochs.stop) if epochs else {}
    ends = not epochs or epochs.stop == args.epochs
    evaluated = (["valid"] if epochs else []) + (["test"] if ends else [])
    wanted = rows_wanted(s.splits, drawn, evaluated, s.batching.size, s.place)  # + eval rows
    on_disk = None  # or in DATA/.cache/features, for later runs
    if not args.no_data_cache and args.feature_cache_limit_mb > 0:
        on_disk = DiskCache(Path(args.data) / ".cache" / "features", args.feature_cache_limit_mb)
    limit = args.feature_store_limit_mb
    return FeatureStore.build(s.model, wanted, s.place, s.batching, limit, on_disk)


def evaluate_split(s, split, features):
    """evaluate() on one split, timed into progress (the ETA's evaluation rate)."""
    start = time.perf_counter()
    data = {task: by[split] for task, by in s.splits.items()}
    stored = features and features.of(split)
    metrics = evaluate(s.model, data, s.place, s.batching, stored, what=split)
    s.progress.eval_seconds += time.perf_counter() - start
    s.progress.eval_examples += sum(len(part) for part in data.values())
    return metrics


def evaluate_best(s, features):
    """The best model by validation, scored on the test split; writes summary.json. Returns 0."""
    s.folder.restore_best(s.model, s.progress, s.best_weights)
    metrics = evaluate_split(s, "test", features)
    log(f"test: {describe(metrics, s.splits)}")
    run = run_folder.summary(s.progress, vars(s.args), s.place, s.model, s.started, s.data_seconds)
    summary = {"split": "test", **metrics, "feature_store": features and features.stats, **run}
    s.folder.write_json("summary.json", summary)
    out = s.folder.path
    log(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'} and the model: {out} is a model "
        f"folder.\nuse it: python predict.py --model {out} \"Apple opened a store in London.\"")
    return 0


# --- The whole run ---------------------------------------------------------------------------

def main(argv=None):
    """The whole run. Its exit status: 0, 2 for bad input, 128 + n after signal n."""
    args = parse_args(argv)
    try:
        with run_folder.signals_raise_stopped():  # outside the loop, SIGINT/SIGTERM raise Stopped
            return train(set_up(args))
    except Exception as error:
        return run_folder.exit_status(error, args.out)  # one line; a bug here keeps its traceback
    finally:
        run_folder.release()  # the folder's lock; a folder made and left empty is removed
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
