"""Sentence pairs (STS-B): train a bi-encoder or a cross-encoder, with a loop of its own like train.py's.

    python pairs.py --encoder bi --model DIR --epochs 1 --batch-size 16 --out runs/bi
    python pairs.py --encoder cross --model DIR --epochs 1 --batch-size 16 --out runs/cross
    python pairs.py --encoder bi --model DIR --epochs 0 --out runs/zero-shot   # the model as it is
    python embed.py --model runs/bi "A man plays a guitar." "Someone plays music."   # then use it

The STS benchmark (Cer et al., 2017) scores sentence pairs from 0 (unrelated)
to 5 (same meaning). Both encoders learn score / 5 (Reimers & Gurevych, 2019):
  bi     cosine of the two sentences' embeddings, regressed with MSE
         (sentence-transformers' CosineSimilarityLoss)
  cross  one logit from both sentences in one pass, BCE-with-logits against
         score / 5 (its CrossEncoder's default loss); the score is its sigmoid
Both are scored by Spearman's rank correlation between predicted and gold
scores on dev, the usual STS-B figure; test too where DATA/stsb/sts-test.csv
is there. docs/pairs.md compares them on quality and cost.

Reading order: the flags; pair_loss and evaluate; set_up; train, the loop
(the shape of train.py's: forward, loss, backward, optimizer step; evaluate,
keep the best, checkpoint); test. The data and the model are in
sentence_pairs.py; the rest is the same plain helpers train.py calls.
"""

from support import cpu_threads  # noqa: F401  first: before torch starts, how its CPU threads wait

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from support import checkpoint
from support import distributed
from support import flags
import freeze
from support import interop
from support import run_folder
from support.checkpoint import Progress
from data import Batching, MultiTaskSampler, length_batches, limit_split, load_tokenizer
from lr import adamw, format_groups, lr_factor, param_groups, part_rates
from support.metrics import pearson, spearman
from model import NORMS, POOLS
from support.model_folder import check_fits, load_pretrained, pooling_note
from support.runtime import (HelpFormatter, Place, Report, UsageError, describe_precision, log, optimizer_step,
                             plural)
from support.sentence_pairs import PAIR_KINDS, PairModel, collate_pairs, load_stsb
from support.step_log import StepLog, Work


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a bi-encoder or a cross-encoder on STS-B sentence pairs.",
                                formatter_class=HelpFormatter)
    p.add_argument("--encoder", choices=PAIR_KINDS,
                   help="required: bi: embed each sentence alone, score = cosine; cross: both sentences in one "
                        "pass (with --resume, the saved run's)")
    p.add_argument("--data", default="data", help="data folder: reads stsb/sts-{train,dev,test}.csv (test if there)")
    p.add_argument("--model", help="pretrained BERT folder (default: DATA/bert-base-uncased)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<date>-<time>)")
    g = p.add_argument_group("bi-encoder (default: what the --model folder's sentence-transformers modules.json "
                             "gives, with its projection's weights; else mean, no projection, none)")
    g.add_argument("--pool", choices=POOLS, default=None, help="sentence pooling")
    g.add_argument("--embed-dim", type=int, default=None, help="project the sentence embedding to this size")
    g.add_argument("--normalize", choices=NORMS, default=None, help="normalize the embedding (the cosine is the "
                                                                    "same either way)")
    g = p.add_argument_group("cross-encoder")
    g.add_argument("--head-dropout", type=float, default=None, help="dropout before the head (default: 0.1)")
    g = p.add_argument_group("freezing")
    flags.add_freeze_flags(g, "none | all | backbone | embeddings | lower:N | cls-head (the cross-encoder's "
                              "head, or the bi-encoder's --embed-dim projection)")
    g = p.add_argument_group("learning rates (default: sentence-transformers' trainer defaults, one flat rate)")
    flags.add_rate_flags(g, lr=5e-5, lr_decay=1.0, head_lr=5e-5, warmup=0.0, weight_decay=0.0)
    g = p.add_argument_group("run")
    flags.add_run_flags(g, epochs=1, batch_size=16, data_cache=False)
    g.add_argument("--group-window", type=int, default=0,
                   help="sort by length inside windows of this many batches to cut padding (0: random batches)")
    return flags.parse(p, argv)  # with --resume, the saved run's flags are the defaults


def check_args(args):
    """Flag problems a parser cannot see; raises UsageError naming the flag. Returns the model's heads."""
    flags.check_flags(args, at_least=(("epochs", 0), ("embed_dim", 1), ("group_window", 0)))
    if args.encoder is None:
        raise UsageError("argument --encoder: required: bi or cross")
    if args.encoder == "cross":
        given = [flag for flag in ("pool", "embed_dim", "normalize") if getattr(args, flag) is not None]
        if given:
            raise UsageError(f"argument --{given[0].replace('_', '-')}: only for --encoder bi; the cross-encoder "
                             "scores the pair from its first token")
        args.head_dropout = 0.1 if args.head_dropout is None else args.head_dropout
    if args.encoder == "bi" and args.head_dropout is not None and not args.resume:  # a resumed run's saved flags
        raise UsageError("argument --head-dropout: only for --encoder cross; the bi-encoder has no head before "
                         "its cosine")  # may hold 0.1, the default of every encoder before
    if args.head_dropout is not None and not 0 <= args.head_dropout < 1:
        raise UsageError(f"argument --head-dropout: must be in [0, 1), got {args.head_dropout}")
    # The parts beyond the encoder: the cross-encoder's head, or the bi-encoder's projection (--embed-dim),
    # which --freeze cls-head names too.
    heads = ("cls_head",) if args.encoder == "cross" else ("project",) if args.embed_dim else ()
    if heads == ("project",):
        args.freeze = ",".join("project" if item.strip() == "cls-head" else item for item in args.freeze.split(","))
    if any(item.strip() in ("ner-head", *([] if heads else ["cls-head"])) for item in args.freeze.split(",")):
        raise UsageError(f"argument --freeze: this {args.encoder}-encoder has no "
                         f"{'NER head' if 'ner-head' in args.freeze else 'head (give --embed-dim for a projection)'}")
    if args.unfreeze == "gradual" and not heads:
        raise UsageError("argument --unfreeze: gradual starts by training the heads alone, and this bi-encoder has "
                         "none; give --embed-dim for a projection to train first, or leave --unfreeze out")
    return heads


# --- The loss and evaluation -----------------------------------------------------------

def pair_loss(outputs, scores, kind, normalizer=None):
    """The loss of a batch, in fp32, against score / 5 in [0, 1].

    bi: MSE between the cosine and score / 5; cross: BCE-with-logits against
    score / 5. The mean, or with a normalizer the sum divided by it: a
    data-parallel run passes (pairs in the global batch) / (number of ranks),
    so that DDP's average over ranks is the mean over the global batch.
    """
    target, outputs = scores / 5, outputs.float()
    reduction = "mean" if normalizer is None else "sum"
    if kind == "bi":
        loss = F.mse_loss(outputs, target, reduction=reduction)
    else:
        loss = F.binary_cross_entropy_with_logits(outputs, target, reduction=reduction)
    return loss if normalizer is None else loss / normalizer


@torch.no_grad()
def evaluate(model, data, place, batching, what="evaluation"):
    """Spearman and Pearson between predicted and gold scores on one split, and the rate.

    Predicted: the cosine (bi) or the sigmoid of the logit (cross); a rank
    correlation needs every prediction at once, so with several ranks each rank
    scores the whole split (STS-B's splits are small). The rate counts what the
    encoder ran on: sentences (bi, two per pair) or pairs (cross) per second. what: the split's name,
    for the progress line of a long pass.
    """
    model.eval()
    report = Report(f"{what} pass", len(data), unit="pairs", total_cost=int(data.lengths().sum()))
    predicted = np.zeros(len(data))
    start = time.perf_counter()
    for indices in length_batches(data.lengths(), batching.size):
        batch = place.to_device(collate_pairs(data, indices, batching.pad_id))
        with place.autocast():
            outputs = model(batch).float()
        predicted[indices] = (outputs if model.kind == "bi" else torch.sigmoid(outputs)).cpu().numpy()
        report.update(len(indices), int(data.lengths()[indices].sum()))
    seconds = time.perf_counter() - start
    unit, count = ("sentences", 2 * len(data)) if model.kind == "bi" else ("pairs", len(data))
    correlations = {"spearman": spearman(predicted, data.scores), "pearson": pearson(predicted, data.scores)}
    finite = np.isfinite(predicted).all()
    if not finite:  # a NaN would take a rank of its own, and Spearman a value
        correlations = dict.fromkeys(correlations, math.nan)
    if undefined := [name for name, value in correlations.items() if math.isnan(value)]:  # None (null in JSON)
        why = ("some predicted scores are not numbers" if not finite else
               "every predicted score is the same (are the pairs cut to nothing by --max-len?)"
               if np.ptp(predicted) == 0 else "every gold score is the same")
        verb = "are" if len(undefined) > 1 else "is"
        log(f"{what}: {' and '.join(map(str.capitalize, undefined))} {verb} undefined: {why}")
        correlations.update(dict.fromkeys(undefined))
    return {**correlations, f"{unit}_per_s": round(count / seconds, 1)}


def dev_score(metrics):
    """What picks the best epoch: dev Spearman; where it is undefined, -2, below any Spearman, so that a
    later epoch with a defined one beats it."""
    return -2.0 if metrics["spearman"] is None else metrics["spearman"]


def describe(metrics):
    rate = next(f"{v:,.0f} {k.removesuffix('_per_s')}/s" for k, v in metrics.items() if k.endswith("_per_s"))
    shown = {k: "undefined" if metrics[k] is None else f"{100 * metrics[k]:.2f}" for k in ("spearman", "pearson")}
    return f"Spearman {shown['spearman']} | Pearson {shown['pearson']} | {rate}"


# --- Set-up ----------------------------------------------------------------------------

@dataclass
class Setup:
    """What set_up builds: everything the loop reads, and `progress`, which it moves on (as in train.py)."""
    args: argparse.Namespace
    place: Place
    folder: run_folder.RunFolder
    model: PairModel
    splits: dict  # {split: sentence_pairs.PairData}: train, valid (STS-B's dev), and test where it is there
    sampler: MultiTaskSampler  # one task, "sts": which pairs form each batch
    plan: freeze.Plan
    rates: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    progress: Progress
    fingerprint: dict
    started: float
    data_seconds: float
    best_weights: dict = None


def set_up(args):
    """Check the flags; read the model and the pairs; build the model, its optimizer and the sampler; with
    --resume, restore all of it from the checkpoint. Returns the Setup."""
    started = time.perf_counter()
    heads = check_args(args)
    place = distributed.init(args.device, args.amp)
    tokenizer, bert = load_tokenizer(args.model), load_pretrained(args.model, new_heads=True)
    check_fits(tokenizer, bert.config, args.max_len, args.model)
    note, modules = flags.resolve_defaults(args, bert.config)  # --lr auto; a sentence-transformers folder's
    if note:  # pooling, projection and normalization, as a bi-encoder's defaults
        log(note)
    plan = flags.freeze_plan(args, bert.config, heads)
    folder, saved = run_folder.claim(args, place)
    splits = load_stsb(args.data, tokenizer, args.max_len, args.encoder)
    splits = {split: limit_split(data, args.limit) for split, data in splits.items()}
    data_seconds = time.perf_counter() - started
    log("stsb: " + ", ".join(f"{s} {plural(len(d), 'pair')} ({sum(d.truncated)} truncated)" for s, d in splits.items()))

    torch.manual_seed(args.seed)  # the same initial head on every rank
    bert.unpad = args.unpad  # which batches compute only their real tokens (model.Packing)
    model = PairModel(bert, args.encoder, args.pool, args.embed_dim, args.normalize, args.head_dropout)
    if modules is not None and (note := interop.start_from(model.encoder, modules)):
        log(note)  # the folder's pooler and projection, where they fit the flags
    model = model.to(place.device)
    if args.encoder == "bi" and (note := pooling_note(bert.config, args.pool)):
        log(note)
    freeze.apply_freeze(model, plan.frozen_at(0))
    log(f"{args.encoder}-encoder parameters (--freeze {args.freeze}{', --unfreeze gradual' if plan.gradual else ''}):")
    log(freeze.trainable_summary(model))
    log(f"device {place.device}, {describe_precision(place, args.amp)}")
    sampler = MultiTaskSampler({"sts": splits["train"].lengths()}, args.batch_size, args.seed, args.group_window,
                               (place.rank, place.world_size))

    rates = part_rates(plan.num_layers, args.lr, args.lr_decay, {"cls_head": args.head_lr, "project": args.head_lr})
    groups = param_groups(model, rates, args.weight_decay)
    optimizer = adamw(groups, place.device)
    if plan.trains(args.epochs):
        log("optimizer groups:\n" + format_groups(groups))
    for epoch in range(1, checkpoint.epochs_begun(saved)) if plan.gradual else ():  # --resume: its groups
        freeze.release(model, optimizer, plan.frozen_at(epoch), rates, args.weight_decay)
    sources = {split: data.source for split, data in splits.items()}
    scaler, progress, fingerprint = checkpoint.start(args, place, model, optimizer, sources, saved)
    return Setup(args, place, folder, model, splits, sampler, plan, rates, optimizer, scaler, progress, fingerprint,
                 started, data_seconds)


# --- The loop ---------------------------------------------------------------------------

def train(s):
    """The run: for each epoch, for each batch: forward, loss, backward, optimizer step, log; at the
    epoch's end: evaluate on dev, keep the best, checkpoint; then the best model on dev and test. Returns
    the exit status."""
    args, model, place, progress, optimizer, scaler = s.args, s.model, s.place, s.progress, s.optimizer, s.scaler
    epochs = run_folder.epochs_to_run(progress, args) if s.plan.trains(args.epochs) else range(0)
    steps_per_epoch = len(s.sampler.epoch(0))
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup * total_steps)
    batching = Batching(2 * args.batch_size, model.bert.config.pad_token_id)  # evaluation: no activations kept
    final = [len(s.splits[split]) for split in ("valid", "test") if split in s.splits]
    steps = StepLog(("sts",), place, args.log_every, scaler, Work(total_steps, s.sampler.batch_size, args.epochs,
                                                                  len(s.splits["valid"]), sum(final)))
    if not s.plan.trains(args.epochs):
        log(f"nothing trains (--epochs {args.epochs}, --freeze {args.freeze}): scoring the model as it is")
    else:
        log(f"training: {plural(args.epochs, 'epoch')} x {plural(steps_per_epoch, 'step')} of "
            f"{plural(s.sampler.batch_size, 'pair')}; warmup {plural(warmup_steps, 'step')}")
    ddp = distributed.wrap(model, place)  # DDP under torchrun, else the model itself
    with run_folder.StopSignals() as stop:  # SIGINT, SIGTERM: the step finishes, a checkpoint is saved
        for epoch in epochs:
            if s.plan.gradual and epoch > 0 and progress.batch == 0:  # gradual unfreezing: release a layer
                released = freeze.release(model, optimizer, s.plan.frozen_at(epoch), s.rates, args.weight_decay)
                ddp = distributed.wrap(model, place)  # DDP fixes its parameters when it is built
                log(f"epoch {epoch + 1}: unfroze {len(released)} tensors\n{freeze.trainable_summary(model)}")
            freeze.set_train_mode(model, s.plan.frozen_at(epoch))
            batches = s.sampler.epoch(epoch)
            steps.start_epoch(len(batches))
            for b in range(progress.batch, len(batches)):
                _, global_batch = batches[b]
                indices = s.sampler.share(global_batch)  # this rank's part of the global batch
                batch = place.to_device(collate_pairs(s.splits["train"], indices, batching.pad_id))
                factor = lr_factor(progress.step, total_steps, warmup_steps)  # warmup, then linear decay
                for group in optimizer.param_groups:  # each part's rate (lr.py) x the schedule
                    group["lr"] = group["base_lr"] * factor
                with place.autocast():
                    outputs = ddp(batch)  # (B,): cosines (bi) or logits (cross)
                loss = pair_loss(outputs, batch["scores"], model.kind, len(global_batch) / place.world_size)
                if loss.requires_grad:  # False when everything is frozen
                    scaler.scale(loss).backward()
                    progress.skipped_steps += optimizer_step(optimizer, scaler, args.clip)  # unscale, clip, step
                progress.step, progress.batch = progress.step + 1, b + 1
                steps.add("sts", loss.detach(), len(global_batch))  # then: a stop signal? a log line? a NaN loss?
                if signum := steps.after_step(progress, stop.signum, optimizer):
                    progress.train_seconds += steps.stop(progress)  # a signal: save a checkpoint, stop
                    s.folder.save_checkpoint(progress, model, optimizer, scaler, s.fingerprint)
                    return run_folder.stopped(signum, s.folder.path, f"at step {progress.step}")

            # The epoch's end: evaluate on dev, keep the best model, save a checkpoint.
            progress.train_seconds += steps.end_epoch()
            metrics = evaluate_split(s, "valid", batching)
            progress.history.append({"epoch": epoch + 1, "step": progress.step, "split": "valid",
                                     "spearman": metrics["spearman"], "pearson": metrics["pearson"],
                                     **steps.epoch_record(progress, time.perf_counter() - s.started)})
            s.folder.write_json("metrics.jsonl", progress.history, lines=True)
            log(f"epoch {epoch + 1} valid: {describe(metrics)}")
            score = dev_score(metrics)
            if progress.best is None or score > progress.best["score"]:
                progress.best = {"score": score, "epoch": epoch + 1}
                s.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                s.folder.save_model(model)
                log(f"  best so far: saved {s.folder.path / 'model.safetensors'}")
            progress.epoch, progress.batch = epoch + 1, 0
            s.folder.save_checkpoint(progress, model, optimizer, scaler, s.fingerprint)  # all that --resume needs
            if signum := distributed.agree([stop.signum], place)[0]:  # it came during evaluation or saving
                return run_folder.stopped(signum, s.folder.path, f"after epoch {epoch + 1}")
    if epochs and epochs.stop < args.epochs:  # --stop-after
        return run_folder.paused(epochs.stop, s.folder.path)
    return evaluate_best(s, batching)


def evaluate_split(s, split, batching):
    """evaluate() on one split, timed into progress (the ETA's evaluation rate)."""
    start = time.perf_counter()
    metrics = evaluate(s.model, s.splits[split], s.place, batching, what=split)
    s.progress.eval_seconds += time.perf_counter() - start
    s.progress.eval_examples += len(s.splits[split])
    return metrics


def evaluate_best(s, batching):
    """The best model by dev Spearman, scored on dev (and test, where it is there); writes summary.json."""
    model, progress = s.model, s.progress
    s.folder.restore_best(model, progress, s.best_weights)
    results = {}
    for split in ("valid", "test") if "test" in s.splits else ("valid",):
        results[split] = evaluate_split(s, split, batching)
        log(f"{split}: {describe(results[split])}")
    rate = {k: v for k, v in results["valid"].items() if k.endswith("_per_s")}
    summary = {"encoder": model.kind,
               **{{"valid": "dev", "test": "test"}[split]: {"spearman": m["spearman"], "pearson": m["pearson"]}
                  for split, m in results.items()},
               "inference": {**rate, "batch_size": batching.size, "split": "dev"},
               **run_folder.summary(progress, vars(s.args), s.place, model, s.started, s.data_seconds)}
    s.folder.write_json("summary.json", summary)
    out = s.folder.path
    use = (f"python embed.py --model {out} \"A man plays a guitar.\"" if model.kind == "bi" else
           f"CrossEncoder(\"{out}\") in sentence-transformers, or sentence_pairs.load_pairs(\"{out}\")")
    log(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'} and the model: {out} is a model folder.\n"
        f"use it: {use}")
    return 0


def main(argv=None):
    """The whole run; the exit status: 0, 2 for bad input, 128 + n after signal n (run_folder.exit_status)."""
    args = parse_args(argv)
    try:
        with run_folder.signals_raise_stopped():  # outside the loop, SIGINT and SIGTERM raise run_folder.Stopped
            return train(set_up(args))
    except Exception as error:
        return run_folder.exit_status(error, args.out)  # one line; a bug in this code keeps its traceback
    finally:
        run_folder.release()
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
