"""Sentence pairs (STS-B): a bi-encoder and a cross-encoder, trained on the loop train.py uses.

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

Reading order: the flags; pair_loss and evaluate; Pairs, the job this script
gives the loop (loop.py: the step, the epochs, checkpoints, resume, the final
evaluation); set_up. The model is model.PairModel.
"""

import argparse
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import distributed
import freeze
import loop
from data import (MultiTaskSampler, check_fits, collate_pairs, copy_tokenizer, length_batches, limit_split,
                  load_stsb, load_tokenizer)
from lr import part_rates
from metrics import pearson, spearman
from model import NORMS, PAIR_KINDS, POOLS, PairModel, load_pairs, load_pretrained, pooling_note, save_trained
from runtime import PRECISION_NAMES, Place, Report, UsageError, pick_amp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a bi-encoder or a cross-encoder on STS-B sentence pairs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", choices=PAIR_KINDS, required=True,
                   help="bi: embed each sentence alone, score = cosine; cross: both sentences in one pass")
    p.add_argument("--data", default="data", help="data folder: reads stsb/sts-{train,dev,test}.csv (test if there)")
    p.add_argument("--model", default="data/bert-base-uncased", help="pretrained BERT folder")
    p.add_argument("--out", default=None, help="output folder (default: runs/<date>-<time>)")
    g = p.add_argument_group("model")
    g.add_argument("--pool", choices=POOLS, default=None, help="bi: sentence pooling (default mean)")
    g.add_argument("--embed-dim", type=int, default=None, help="bi: project the sentence embedding to this size")
    g.add_argument("--normalize", choices=NORMS, default=None, help="bi: normalize the embedding (default none; "
                                                                    "the cosine is the same either way)")
    g.add_argument("--head-dropout", type=float, default=0.1, help="cross: dropout before the head")
    g = p.add_argument_group("freezing")
    loop.add_freeze_flags(g, "none | all | backbone | embeddings | lower:N | cls-head (the cross-encoder's "
                             "head, or the bi-encoder's --embed-dim projection)")
    g = p.add_argument_group("learning rates (default: sentence-transformers' trainer defaults, one flat rate)")
    loop.add_rate_flags(g, lr=5e-5, lr_decay=1.0, head_lr=5e-5, warmup=0.0, weight_decay=0.0)
    g = p.add_argument_group("run")
    loop.add_run_flags(g, epochs=1, batch_size=16, data_cache=False)
    g.add_argument("--group-window", type=int, default=0,
                   help="sort by length inside windows of this many batches to cut padding (0: random batches)")
    return p.parse_args(argv)


def check_args(args):
    """Flag problems a parser cannot see; raises UsageError naming the flag."""
    loop.check_flags(args, at_least=(("epochs", 0), ("embed_dim", 1), ("group_window", 0)))
    if not 0 <= args.head_dropout < 1:
        raise UsageError(f"argument --head-dropout: must be in [0, 1), got {args.head_dropout}")
    if args.encoder == "cross":
        given = [flag for flag in ("pool", "embed_dim", "normalize") if getattr(args, flag) is not None]
        if given:
            raise UsageError(f"argument --{given[0].replace('_', '-')}: only for --encoder bi; the cross-encoder "
                             "scores the pair from its first token")
    else:
        args.pool, args.normalize = args.pool or "mean", args.normalize or "none"


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
def evaluate(model, data, place, batch_size, pad_id, log=None, what="evaluation"):
    """Spearman and Pearson between predicted and gold scores on one split, and the rate.

    Predicted: the cosine (bi) or the sigmoid of the logit (cross); a rank
    correlation needs every prediction at once, so with several ranks each rank
    scores the whole split (STS-B's splits are small). The rate counts what the
    encoder ran on: sentences (bi, two per pair) or pairs (cross) per second.
    """
    model.eval()
    report = Report(f"{what} pass", len(data), log, unit="pairs", total_cost=int(data.lengths().sum())) if log else None
    predicted = np.zeros(len(data))
    start = time.perf_counter()
    for indices in length_batches(data.lengths(), batch_size):
        batch = place.to_device(collate_pairs(data, indices, pad_id))
        with place.autocast():
            outputs = model(batch).float()
        predicted[indices] = (outputs if model.kind == "bi" else torch.sigmoid(outputs)).cpu().numpy()
        if report:
            report.update(len(indices), int(data.lengths()[indices].sum()))
    seconds = time.perf_counter() - start
    unit, count = ("sentences", 2 * len(data)) if model.kind == "bi" else ("pairs", len(data))
    return {"spearman": spearman(predicted, data.scores), "pearson": pearson(predicted, data.scores),
            f"{unit}_per_s": round(count / seconds, 1)}


# --- The job the loop runs ------------------------------------------------------------------

class Pairs:
    """STS-B pairs for a PairModel: what loop.py needs to train and score it."""
    tasks = ("sts",)

    def __init__(self, args, model, splits, place, rates, pad_id):
        self.model, self.splits, self.place, self.rates, self.pad_id = model, splits, place, rates, pad_id
        self.kind = model.kind
        self.eval_batch_size = 2 * args.batch_size  # no activations are kept for backward
        self.final_splits = ("valid", "test") if "test" in splits else ("valid",)
        self.sampler = MultiTaskSampler({"sts": splits["train"].lengths()}, args.batch_size, args.seed,
                                        args.group_window, place.rank, place.world_size)
        self.batch_size = self.sampler.batch_size
        self.forward = None  # what a step calls: set by rebuild(), once loop.start has replayed any releases

    def epoch(self, epoch):
        return self.sampler.epoch(epoch)

    def loss(self, task, global_batch):
        indices = self.sampler.share(global_batch)  # this rank's part of the global batch
        batch = self.place.to_device(collate_pairs(self.splits["train"], indices, self.pad_id))
        with self.place.autocast():
            outputs = self.forward(batch)  # (B,): cosines (bi) or logits (cross)
        return pair_loss(outputs, batch["scores"], self.kind, len(global_batch) / self.place.world_size)

    def evaluate(self, split, log):
        return evaluate(self.model, self.splits[split], self.place, self.eval_batch_size, self.pad_id, log, split)

    def size(self, split):
        return len(self.splits[split])

    def sources(self):
        """Every split's fingerprint (its file's bytes, the tokenizer, max_len): what the checkpoint pins."""
        return {split: data.source for split, data in self.splits.items()}

    def record(self, metrics):
        return {"spearman": metrics["spearman"], "pearson": metrics["pearson"]}

    def describe(self, metrics):
        rate = next(f"{v:,.0f} {k.removesuffix('_per_s')}/s" for k, v in metrics.items() if k.endswith("_per_s"))
        return f"Spearman {100 * metrics['spearman']:.2f} | Pearson {100 * metrics['pearson']:.2f} | {rate}"

    def score(self, metrics):
        """Dev Spearman; -inf where it is undefined (constant predictions), so any later epoch beats it."""
        return -math.inf if math.isnan(metrics["spearman"]) else metrics["spearman"]

    def summary(self, results):
        """Spearman and Pearson of the best model on dev (and test), and the inference rate on dev."""
        named = {"valid": "dev", "test": "test"}
        out = {"encoder": self.kind, **{named[s]: self.record(m) for s, m in results.items()}}
        rate = {k: v for k, v in results["valid"].items() if k.endswith("_per_s")}
        out["inference"] = {**rate, "batch_size": self.eval_batch_size, "split": "dev"}
        return out

    def save(self, out, extra):
        save_trained(self.model, out, extra=extra)

    def saved(self, out):
        return load_pairs(out).state_dict()

    def rebuild(self):
        """What a step calls: the model, in DDP under torchrun; rebuilt after gradual unfreezing."""
        self.forward = None  # free the old DDP and its gradient hooks before building the next
        self.forward = distributed.wrap(self.model, self.place)


# --- Set-up ----------------------------------------------------------------------------

def set_up(args):
    """Flags checked, inputs read, the model built and frozen; returns the loop's Run."""
    started = time.perf_counter()
    check_args(args)
    rank, world_size, device = distributed.init(args.device)
    place = Place(device, pick_amp(args.amp, device), rank, world_size)
    log = print if rank == 0 else (lambda *_, **__: None)  # only rank 0 speaks, and only rank 0 writes
    tokenizer = load_tokenizer(args.model)
    bert = load_pretrained(args.model)
    check_fits(tokenizer, bert.config, args.max_len, args.model)
    if note := loop.resolve_auto_rates(args, bert.config):
        log(note)
    heads = ("cls_head",) if args.encoder == "cross" or args.embed_dim else ()
    if any(item.strip() in ("ner-head", *([] if heads else ["cls-head"])) for item in args.freeze.split(",")):
        raise UsageError(f"argument --freeze: this {args.encoder}-encoder has no "
                         f"{'NER head' if 'ner-head' in args.freeze else 'head (give --embed-dim for a projection)'}")
    if args.unfreeze == "gradual" and not heads:
        raise UsageError("argument --unfreeze: gradual starts by training the heads alone, and this bi-encoder has "
                         "none; give --embed-dim for a projection to train first, or leave --unfreeze out")
    plan = loop.freeze_plan(args, bert.config, heads)
    plan.base.discard("ner_head")  # --freeze all: there is none to freeze
    out, saved = loop.open_out(args, world_size, rank)
    splits = load_stsb(args.data, tokenizer, args.max_len, args.encoder)
    splits = {split: limit_split(data, args.limit) for split, data in splits.items()}
    data_seconds = time.perf_counter() - started
    log("stsb: " + ", ".join(f"{s} {len(d):,} pairs ({sum(d.truncated)} truncated)" for s, d in splits.items()))

    torch.manual_seed(args.seed)  # the same initial head on every rank
    model = PairModel(bert, args.encoder, args.pool, args.embed_dim, args.normalize, args.head_dropout).to(device)
    if args.encoder == "bi" and (note := pooling_note(bert.config, args.pool)):
        log(note)
    freeze.apply_freeze(model, plan.frozen_at(0))
    log(f"{args.encoder}-encoder parameters (--freeze {args.freeze}{', --unfreeze gradual' if plan.gradual else ''}):")
    log(freeze.trainable_summary(model))
    log(f"device {place.device}, {PRECISION_NAMES[place.amp_dtype]}")
    rates = part_rates(plan.num_layers, args.lr, args.lr_decay, args.head_lr)
    job = Pairs(args, model, splits, place, rates, bert.config.pad_token_id)
    run = loop.start(args, job, plan, place, out, saved, log, started, data_seconds)
    job.rebuild()  # after a resume's replayed releases: DDP must hold every parameter that trains now
    loop.on_rank0(run, copy_tokenizer, args.model, out)  # so that OUT is a complete model folder (embed.py)
    if not plan.trains(args.epochs):
        log(f"nothing trains (--epochs {args.epochs}, --freeze {args.freeze}): scoring the model as it is")
    else:
        log(f"training: {args.epochs} epochs x {run.steps_per_epoch} steps of {job.batch_size} pairs; "
            f"warmup {run.warmup_steps} steps")
    return run


def main(argv=None):
    """The whole run (loop.run_script: set_up, each epoch and its end, the final evaluation); the exit status."""
    return loop.run_script(set_up, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
