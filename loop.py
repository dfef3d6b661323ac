"""The training loop in phases, for any job: train.py's two tasks and pairs.py's sentence pairs.

    run = start(args, job, plan, place, out, saved, log, started, data_seconds)
    return run_loop(run)      # each epoch, its end, then the final evaluation; the exit status

A job is what differs between the scripts; the loop owns the rest (the
learning-rate schedule, one AMP path, freezing by epoch, checkpoints with
exact resume, stop signals, progress lines, atomic output). A job has:

  model            the module that trains, with .bert (freeze.py, lr.py and the checkpoint see it)
  tasks            the names of its losses, one column each in the log line
  batch_size       examples in a global batch (all ranks together)
  rates            part -> base learning rate (lr.part_rates)
  epoch(e)         [(task, example indices of the global batch)] of epoch e, in order
  loss(task, idx)  this rank's forward pass and loss on its share of a global batch (a tensor)
  evaluate(split, log)   metrics of the current model on "valid" or "test"
  size(split)      examples in a split (the ETA and the evaluation rate count them)
  sources()        {split name: fingerprint of its file and tokenization}, pinned in the checkpoint
  record(m), describe(m), score(m)   metrics -> fields of metrics.jsonl, a log line, the
                   number that picks the best epoch (higher is better)
  final_splits     the splits evaluated with the best model at the end
  summary(results) {split: metrics} of those -> the job's fields of summary.json
  save(out, extra) write the model folder; saved(out) reads its weights back (a state dict)
  rebuild()        after gradual unfreezing released parameters (DDP must know them)

Reading order: flags shared by the scripts -> open_out (the run folder, its
lock, and --resume) -> start (optimizer, scaler, restore) -> train_step, the
one step (rates, forward, loss, backward, clip, step) -> train_epoch ->
end_of_epoch -> final_evaluation -> run_loop -> run_script, which turns every
way a run ends into an exit status and one line.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

import checkpoint
import distributed
import freeze
from checkpoint import Checkpoint, Progress
from features import weights_hash
from lr import AUTO, EMBEDDINGS_SHARE, auto_decay, auto_top_rate, format_groups, lr_factor, param_groups
from data import DataError
from model import CheckpointError
from runtime import PRECISION_NAMES, Place, UsageError, duration, optimizer_step, os_error_line, write_json

# --- Flags both scripts take ---------------------------------------------------------------


MAX_SEED = 2**32 - 1  # numpy's generators take no negative seed, torch none past 64 bits


def add_freeze_flags(group, strategies):
    group.add_argument("--freeze", default="none", help=f"{strategies}, or a comma list")
    group.add_argument("--unfreeze", choices=("none", "gradual"), default="none",
                       help="gradual: start with the backbone frozen, release one layer per epoch from the top")


def number_or_auto(text):
    """argparse type of --lr and --lr-decay, which take a number or "auto" (resolve_auto_rates)."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or {AUTO}, got {text!r}") from None


def add_rate_flags(group, lr=AUTO, lr_decay=AUTO, head_lr=1e-3, warmup=0.1, weight_decay=0.01):
    group.add_argument("--lr", type=number_or_auto, default=lr,
                       help="learning rate of the top encoder layer; auto: 5e-5 x (768 / hidden size)^2, at most 3e-4 "
                            "(5e-5 for bert-base, 2e-4 for all-MiniLM-L6-v2)")
    group.add_argument("--lr-decay", type=number_or_auto, default=lr_decay,
                       help="each lower layer gets this times the one above; auto: the decay that leaves the "
                            f"embeddings {EMBEDDINGS_SHARE:.2f} of --lr (0.949 for 12 layers, 0.9 for 6)")
    group.add_argument("--head-lr", type=float, default=head_lr, help="learning rate of the heads")
    group.add_argument("--warmup", type=float, default=warmup, help="fraction of steps with linear warmup")
    group.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW's, on weights but not on "
                                                                                "biases and LayerNorm")
    group.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")


def add_run_flags(group, epochs=3, batch_size=32, data_cache=True):
    group.add_argument("--epochs", type=int, default=epochs, help="passes over the training data")
    group.add_argument("--batch-size", type=int, default=batch_size, help="examples per step (per rank under torchrun)")
    group.add_argument("--max-len", type=int, default=128, help="word pieces per example, special tokens included")
    group.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                       help="auto: bf16 on GPUs that have it, else fp16; off (fp32) on the CPU")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda where there is one")
    group.add_argument("--seed", type=int, default=0, help=f"seeds heads, dropout and batch order (0 to {MAX_SEED})")
    group.add_argument("--limit", type=int, default=None, help="use at most N examples per task and split")
    group.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    if data_cache:
        group.add_argument("--no-data-cache", action="store_true", help="do not cache tokenized data in DATA/.cache")
    group.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    group.add_argument("--stop-after", type=int, default=None,
                       help="stop after this many epochs, leaving a checkpoint to --resume (e.g. for job time limits)")


def resolve_auto_rates(args, config):
    """--lr and --lr-decay "auto" -> numbers for this backbone (lr.auto_top_rate, lr.auto_decay);
    returns a line that says what auto chose, or None. The numbers are printed in full, so that
    passing them back gives the same run (and --resume compares them exactly)."""
    chose = []
    if args.lr == AUTO:
        args.lr = auto_top_rate(config.hidden_size)
        chose.append(f"--lr {args.lr!r} (hidden size {config.hidden_size})")
    if args.lr_decay == AUTO:
        args.lr_decay = auto_decay(config.num_hidden_layers)
        chose.append(f"--lr-decay {args.lr_decay!r} ({config.num_hidden_layers} layers)")
    return "auto rates: " + ", ".join(chose) if chose else None


def check_flags(args, rates=(), at_least=()):
    """The checks of add_rate_flags' and add_run_flags' values, plus a script's own `rates` (>= 0)
    and `at_least` ((flag, lowest value) pairs, which may also lower a shared flag's); raises
    UsageError naming the flag."""
    for flag in ("lr", "head_lr", "weight_decay", "clip", *rates):
        value = getattr(args, flag)
        if value is not None and value != AUTO and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"argument --{flag.replace('_', '-')}: must be a number >= 0, got {value}")
    lows = {"epochs": 1, "batch_size": 1, "max_len": 3, "log_every": 1, "limit": 1, "stop_after": 1, **dict(at_least)}
    for flag, low in lows.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UsageError(f"argument --{flag.replace('_', '-')}: must be at least {low}, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"argument --seed: must be a whole number from 0 to {MAX_SEED}, got {args.seed}")
    if args.lr_decay != AUTO and not 0 < args.lr_decay <= 1:
        raise UsageError(f"argument --lr-decay: must be in (0, 1], got {args.lr_decay}")
    if not 0 <= args.warmup < 1:
        raise UsageError(f"argument --warmup: must be a fraction in [0, 1), got {args.warmup}")
    if args.resume and args.out is None:
        raise UsageError("argument --resume: give --out, the folder of the run to continue")
    if not Path(args.data).is_dir():
        raise UsageError(f"argument --data: {args.data} is not a folder; run `python download.py` first")


def freeze_plan(args, config, heads=tuple(freeze.TASK_HEADS.values())):
    """--freeze and --unfreeze for this backbone and the model's heads, as a freeze.Plan; UsageError
    names a bad flag."""
    try:
        plan = freeze.Plan.from_flags(args.freeze, args.unfreeze, config.num_hidden_layers, config.has_pooler, heads)
    except ValueError as e:
        raise UsageError(f"argument --freeze: {e}") from None
    if plan.gradual and freeze.backbone_parts(plan.num_layers, plan.pooler) <= plan.base:
        raise UsageError(f"argument --unfreeze: gradual unfreezing releases the backbone layer by layer, but --freeze "
                         f"{args.freeze} keeps all of it frozen; gradual already starts from a frozen backbone, so "
                         "leave 'backbone' out of --freeze")
    return plan


def open_out(args, world_size, rank=0):
    """The run folder, made and locked, and with --resume the checkpoint in it, read and checked against
    the flags. Returns (out, saved Checkpoint or None)."""
    if world_size > 1 and args.out is None:
        raise UsageError("argument --out: give --out under torchrun, so that every process uses the same folder")
    out = Path(args.out) if args.out else new_run_folder()
    args.out = str(out)  # the folder chosen, as the run's flags, summary.json and any hint name it
    try:
        out.mkdir(parents=True)
        if rank == 0:
            _MADE.append(out)
    except FileExistsError:  # a folder given again (--resume), or made a moment ago by another rank
        pass
    except OSError as e:
        raise UsageError(f"argument --out: cannot create {out} ({e.strerror})") from None
    if rank == 0:  # the process that writes holds the folder; the other ranks of its job join it
        lock_folder(out)
    path, saved = checkpoint.path_in(out), None
    if args.resume:
        if not path.exists():
            raise UsageError(f"argument --resume: {path} not found")
        saved = checkpoint.read(path)
        checkpoint.check_resume(path, saved.progress, vars(args), world_size)
    elif path.exists():
        raise UsageError(f"argument --out: {out} already holds a run; add --resume to continue it, "
                         "or choose another --out")
    return out, saved


def new_run_folder():
    """runs/<date>-<time>, made here; a second run started in the same second gets runs/<date>-<time>-2,
    and so on (mkdir either makes the folder or fails, so two runs never get the same one)."""
    stem = time.strftime("runs/%Y%m%d-%H%M%S")
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        out = Path(stem if n == 1 else f"{stem}-{n}")
        try:
            out.mkdir()
        except FileExistsError:
            continue
        _MADE.append(out)
        return out
    raise UsageError(f"argument --out: {stem} and 999 folders after it exist; give --out")


_HELD = []  # the open lock files: a lock lasts as long as its file stays open, so until the process ends
_MADE = []  # the run folders this process made: removed again if it ends having written nothing there


def lock_folder(out):
    """Take OUT/.lock for this process, or raise UsageError naming the process that holds it.

    flock() locks belong to the open file and end with the process, however it
    ends, so a lock left by a run that crashed or was killed is no lock: there
    is nothing stale to clean up.
    """
    path = out / ".lock"
    try:
        handle = open(path, "a+")
    except OSError as e:
        raise UsageError(f"argument --out: cannot write {path} ({e.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"argument --out: {out} is in use by a run still going ({holder}); wait for it, or "
                         "choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _HELD.append(handle)


def unlock_folders():
    """Remove the run folders this process made but wrote nothing into (a run refused during set-up
    leaves no empty folder), while still holding their locks; then release every lock (a script calls
    this as it ends; the process's end would release them too)."""
    while _MADE:
        out = _MADE.pop()
        try:
            if {p.name for p in out.iterdir()} <= {".lock"}:
                (out / ".lock").unlink(missing_ok=True)
                out.rmdir()
        except OSError:  # gone already, or not ours to remove: leave it
            pass
    while _HELD:
        _HELD.pop().close()


# --- The run ---------------------------------------------------------------------------------

@dataclass
class Run:
    """What the phases share. start() builds it; the phases move `progress` on."""
    args: object  # the flags (argparse.Namespace)
    job: object  # what trains and how it is scored (see the module docstring)
    out: Path  # the run folder
    place: Place  # device, autocast dtype, rank of world_size
    log: callable  # print on rank 0, nothing on the other ranks
    plan: freeze.Plan  # the frozen parts of every epoch
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    progress: Progress  # the counters every checkpoint saves
    fingerprint: dict  # the data and pretrained model the run is made from (checkpoint.fingerprint)
    control: object  # the process group for agreeing on a stop (None on one process)
    started: float  # time.perf_counter() at start
    data_seconds: float
    best_weights: dict = None  # the best epoch's weights, kept in memory on every rank

    @property
    def model(self):
        return self.job.model

    @property
    def total_steps(self):
        return self.args.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self):
        return int(self.args.warmup * self.total_steps)

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
        """Does this invocation go on to the final evaluation, rather than stop at --stop-after?"""
        epochs = self.epochs_to_run
        return not epochs or epochs.stop == self.args.epochs


def start(args, job, plan, place, out, saved, log, started, data_seconds):
    """The optimizer (lr.py's groups for what the plan leaves trainable in epoch 0), the scaler,
    and with a saved checkpoint everything restored from it; returns the Run."""
    model = job.model
    groups = param_groups(model, job.rates, args.weight_decay)
    optimizer = torch.optim.AdamW(groups or [{"params": [], "name": "none", "base_lr": 0.0}],
                                  fused=place.device.type == "cuda")
    if plan.trains(args.epochs):
        log("optimizer groups:\n" + format_groups(groups))
    scaler = place.scaler()
    if place.world_size > 1:
        torch.manual_seed(args.seed + 1_000_003 * place.rank)  # different dropout on each rank
    progress = Progress(run=vars(args), world_size=place.world_size)
    data = hashlib.sha256(json.dumps(job.sources(), sort_keys=True).encode()).hexdigest()
    made_from = checkpoint.fingerprint(args.data, data, args.model, weights_hash(model))  # before any training
    if saved is not None:
        checkpoint.check_fingerprint(checkpoint.path_in(out), saved.fingerprint, made_from)
        # Replay the unfreezing the saved run had done, so the optimizer has the same groups.
        for epoch in range(1, saved.progress.epoch + (saved.progress.batch > 0)) if plan.gradual else ():
            freeze.release(model, optimizer, plan.frozen_at(epoch), job.rates, args.weight_decay)
        progress = checkpoint.restore(saved, checkpoint.path_in(out), model, optimizer, scaler, place.rank)
        progress.run = vars(args)
        log(f"resumed from {checkpoint.path_in(out)}: epoch {progress.epoch + 1}, batch {progress.batch}, "
            f"step {progress.step}")
    return Run(args=args, job=job, out=out, place=place, log=log, plan=plan, optimizer=optimizer, scaler=scaler,
               steps_per_epoch=len(job.epoch(0)), progress=progress, fingerprint=made_from,
               control=distributed.control_group(place),
               started=started, data_seconds=data_seconds)


# --- One step, one epoch ---------------------------------------------------------------------

def train_step(run, task, global_batch):
    """One training step on this rank's part of a global batch; returns the loss (a tensor: no GPU sync)."""
    progress, optimizer = run.progress, run.optimizer
    # learning rates: layer-wise base rates (lr.py) times the warmup/decay schedule
    factor = lr_factor(progress.step, run.total_steps, run.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    # batch, forward (under autocast) and loss (in fp32): the job's
    loss = run.job.loss(task, global_batch)
    # backward, clip, step
    if loss.requires_grad:  # False when all of this task's path is frozen: nothing to update
        run.scaler.scale(loss).backward()
        progress.skipped_steps += optimizer_step(optimizer, run.scaler, run.args.clip)
    progress.step += 1
    return loss.detach()


class Meter:
    """Losses and examples since the last log line and since the epoch (re)started."""

    def __init__(self, place, tasks):
        self.place = place
        self.losses = {task: [] for task in tasks}  # loss tensors, turned into numbers only when logging
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
        loss of the global batch.
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
        released = freeze.release(run.model, run.optimizer, frozen, run.job.rates, run.args.weight_decay)
        run.job.rebuild()
        run.log(f"epoch {epoch + 1}: unfroze {len(released)} tensors\n{freeze.trainable_summary(run.model)}")
    freeze.set_train_mode(run.model, frozen, run.plan.num_layers)


def train_epoch(run, epoch, stop):
    """The epoch's steps, from where progress stands. Returns (meter, signal number or 0):
    a signal to any rank stops every rank after the same step."""
    start_epoch(run, epoch)
    batches = run.job.epoch(epoch)
    meter = Meter(run.place, run.job.tasks)
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
    still to come (one on validation per epoch, then the final ones) at the rate measured on the
    passes so far, or before the first one at 3x the training rate (a forward pass without backward)."""
    progress, job = run.progress, run.job
    to_evaluate = (run.args.epochs - len(progress.history)) * job.size("valid")
    to_evaluate += sum(job.size(split) for split in job.final_splits)
    eval_rate = progress.eval_examples / progress.eval_seconds if progress.eval_examples else 3 * speed
    return (run.total_steps - progress.step) * job.batch_size / speed + to_evaluate / eval_rate


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
def on_stop_signals(handler):
    """SIGINT and SIGTERM call handler(signum, frame) inside the block; the previous handlers come back after."""
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def stop_on_signals():
    stop = StopSignal()
    with on_stop_signals(lambda received, _: setattr(stop, "signal", received)):
        yield stop


# --- Saving, end of epoch, final evaluation ----------------------------------------------------

def on_rank0(run, write, *args, **kwargs):
    """Every file a run writes goes through here: only rank 0 writes."""
    if run.place.rank == 0:
        write(*args, **kwargs)


def save_checkpoint(run):
    """Everything --resume needs. Every rank hands in its random state (a collective); rank 0 writes."""
    rngs = distributed.rng_states(run.place)
    on_rank0(run, checkpoint.save, checkpoint.path_in(run.out),
             Checkpoint(run.progress, run.model.state_dict(), run.optimizer.state_dict(), run.scaler.state_dict(),
                        rngs, run.fingerprint))


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
    """The job's evaluation of a split, timed into progress.eval_seconds."""
    start = time.perf_counter()
    metrics = run.job.evaluate(split, run.log)
    run.progress.eval_seconds += time.perf_counter() - start
    run.progress.eval_examples += run.job.size(split)
    return metrics


def end_of_epoch(run, epoch, meter):
    """Evaluate on validation, keep the best model, save a checkpoint."""
    args, progress, job = run.args, run.progress, run.job
    progress.train_seconds += meter.epoch_seconds
    metrics = score_split(run, "valid")
    record = {"epoch": epoch + 1, "step": progress.step, "split": "valid", **job.record(metrics),
              "train_loss": progress.loss_sum / max(progress.loss_count, 1),
              "elapsed_s": round(time.perf_counter() - run.started, 1),
              "samples_per_s": round(meter.epoch_examples / meter.epoch_seconds, 1)}
    progress.loss_sum, progress.loss_count = 0.0, 0
    run.log(f"epoch {epoch + 1} valid: {job.describe(metrics)}")
    progress.history.append(record)
    on_rank0(run, write_json, run.out / "metrics.jsonl", progress.history, lines=True)
    score = job.score(metrics)
    if progress.best is None or score > progress.best["score"]:
        progress.best = {"score": score, "epoch": epoch + 1}
        run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        on_rank0(run, job.save, run.out, extra={"run": vars(args)})
        run.log(f"  best so far: saved {run.out / 'model.safetensors'}")
    progress.epoch, progress.batch = epoch + 1, 0
    save_checkpoint(run)


def final_evaluation(run):
    """The best model by validation, evaluated on the job's final splits; writes summary.json."""
    model, progress, job = run.model, run.progress, run.job
    parameters = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if progress.best is None:  # nothing trained: keep the model as it is
        on_rank0(run, job.save, run.out, extra={"run": vars(run.args)})
    elif run.best_weights is not None:
        model.load_state_dict(run.best_weights)
    else:  # resumed after the best epoch: its weights are on disk (every rank must see OUT)
        model.load_state_dict(job.saved(run.out))
    results = {}
    for split in job.final_splits:
        results[split] = score_split(run, split)
        run.log(f"{split}: {job.describe(results[split])}")
    summary = {**job.summary(results), "best_epoch": progress.best and progress.best["epoch"],
               "config": vars(run.args), "device": str(run.place.device),
               "precision": PRECISION_NAMES[run.place.amp_dtype],
               "timings_s": {"data": round(run.data_seconds, 2), "train": round(progress.train_seconds, 2),
                             "eval": round(progress.eval_seconds, 2),
                             "total": round(time.perf_counter() - run.started, 2)},
               "parameters": parameters, "skipped_steps": progress.skipped_steps,
               "peak_memory_mb": round(run.place.peak_memory_mb(), 1)}
    on_rank0(run, write_json, run.out / "summary.json", summary)
    run.log(f"wrote {run.out / 'summary.json'}, {run.out / 'metrics.jsonl'}, {run.out / 'model.safetensors'}")


def run_loop(run):
    """Each epoch and its end, then the final evaluation; returns the exit status."""
    epochs, ends_with_test = run.epochs_to_run, run.ends_with_test  # before progress moves on
    with stop_on_signals() as stop:
        for epoch in epochs:
            meter, signum = train_epoch(run, epoch, stop)
            if signum:
                return stopped(run, epoch, meter, signum)
            end_of_epoch(run, epoch, meter)
            signum = distributed.agree([stop.signal], run.control, run.place)[0]  # one during evaluation or saving
            if signum:
                run.log(f"stopped by signal {signum} after epoch {epoch + 1}: checkpoint saved; "
                        f"continue with --out {run.out} --resume", file=sys.stderr)
                return 128 + signum
    if not ends_with_test:
        run.log(f"stopping after epoch {epochs.stop} (--stop-after); continue with --out {run.out} --resume")
        return 0
    final_evaluation(run)
    return 0


# --- The whole script -------------------------------------------------------------------------

class Stopped(Exception):
    """SIGINT or SIGTERM outside the training steps: in set-up, a feature build, the final evaluation."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def raise_stopped(signum, _):
    """The handler outside the training steps (run_loop's epochs catch signals more gently: stop_on_signals)."""
    raise Stopped(signum)


def run_script(set_up, args):
    """set_up(args), then run_loop: a script's whole run. Every way it can end is an exit status with at
    most one line for the user: 0; 2 for bad input (UsageError, DataError, CheckpointError) or a failing
    environment (a full disk, a permission, a folder gone); 128 + n for signal n, with what to do next.
    Anything else is a bug in this code, and keeps its traceback."""
    try:
        with on_stop_signals(raise_stopped):
            return run_loop(set_up(args))
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # raised for write failures too, a full disk among them
        print(f"error: a safetensors file could not be written or read ({e}); is the disk full?", file=sys.stderr)
        return 2
    except Stopped as e:
        saved = args.out is not None and checkpoint.path_in(args.out).exists()
        print(f"stopped by signal {e.signum}; " + (f"continue from the last checkpoint with --out {args.out} --resume"
                                                   if saved else "no checkpoint was written yet: start the run again"),
              file=sys.stderr)
        return 128 + e.signum
    finally:
        unlock_folders()
        distributed.close()
