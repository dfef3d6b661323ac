"""The training log line: step, epoch, mean loss per task since the last line, learning rates, speed, ETA.

    step 150/1218 | epoch 1 | loss ag 0.4127 ner 0.2210 | lr 2.00e-04 cls_head 1.00e-03 ner_head 1.00e-03 | ...

A line comes every --log-every steps, at least every LOG_SECONDS, and at an
epoch's last step. The losses stay tensors until a line is due. Under
torchrun, after every step the ranks agree (one small collective) on whether
a line is due, whether any of them got a stop signal, and whether the run
diverged, so that all of them log and stop at the same step.

Divergence stops the run at once (runtime.Diverged: one line, exit status 2):
a loss that is NaN or infinite, or in fp16 SKIPPED_IN_A_ROW steps in a row
that the GradScaler skipped. A few skipped steps are fp16's normal search for
a loss scale; each one halves the scale, so 25 in a row take it from 65,536
below 0.002, and gradients that overflow even there will not recover. Nothing
is saved from a diverged step on: the run folder keeps its last checkpoint.
Checking the loss waits for this step's forward pass on a GPU, while its
backward pass and update still run there.
"""

import time
from dataclasses import dataclass

import torch

import distributed
from runtime import Diverged, duration, log

LOG_SECONDS = 10.0  # the longest a run goes without a log line, whatever --log-every says
SKIPPED_IN_A_ROW = 25  # fp16 steps skipped one after another that count as divergence


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


def current_rates(optimizer):
    """The learning rate now, of the top trained encoder layer and of each trained part above the encoder."""
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups if g["params"] and "no decay" not in g["name"]}
    encoder = [name for name in rates if name.startswith("layer.")]
    shown = [f"lr {rates[max(encoder, key=lambda n: int(n.split('.')[1]))]:.2e}"] if encoder else []
    shown += [f"{part} {rate:.2e}" for part, rate in rates.items()
              if part not in ("embeddings", "pooler") and not part.startswith("layer.")]
    return " ".join(shown) or "lr -"


class StepLog:
    """The losses and examples since the last line and since the epoch (re)started, and the line itself."""

    def __init__(self, tasks, place, every, work):
        self.tasks, self.place, self.every, self.work = tasks, place, every, work
        self.in_a_row = 0  # fp16 steps skipped one after another, up to the last step

    def start_epoch(self, progress):
        self.losses = {task: [] for task in self.tasks}  # loss tensors, turned into numbers only when logging
        self.skipped = progress.skipped_steps  # fp16 steps skipped so far (after_step counts those in a row)
        self.epoch_start = self.interval_start = time.perf_counter()
        self.epoch_examples = self.interval_examples = 0

    def add(self, task, loss, examples):
        self.losses[task].append(loss)
        self.last = task, loss
        self.interval_examples += examples
        self.epoch_examples += examples

    def end_epoch(self):
        """The epoch's training time, in seconds (measured once, as its steps end or stop)."""
        self.epoch_seconds = time.perf_counter() - self.epoch_start
        return self.epoch_seconds

    def epoch_record(self, progress, elapsed):
        """The training fields of the epoch's line in metrics.jsonl: the mean of its logged losses (then
        reset for the next epoch), the run's time so far, and the epoch's speed."""
        record = {"train_loss": progress.loss_sum / max(progress.loss_count, 1), "elapsed_s": round(elapsed, 1),
                  "samples_per_s": round(self.epoch_examples / self.epoch_seconds, 1)}
        progress.loss_sum, progress.loss_count = 0.0, 0
        return record

    def after_step(self, progress, signum, optimizer, last):
        """Agree with the other ranks on a stop signal, on a line due (rank 0's clock) and on divergence
        (raised as runtime.Diverged); print the line when it is due. Returns the signal number any rank
        got (0: none)."""
        due = self.place.rank == 0 and time.perf_counter() - self.interval_start >= LOG_SECONDS
        task, loss = self.last
        self.in_a_row = self.in_a_row + 1 if progress.skipped_steps > self.skipped else 0
        self.skipped = progress.skipped_steps
        finite = bool(torch.isfinite(loss))  # on a GPU this waits for the step's forward pass, not its backward
        signum, due, bad, in_a_row = distributed.agree([signum, int(due), int(not finite), self.in_a_row],
                                                       self.place)
        if bad or in_a_row >= SKIPPED_IN_A_ROW:
            if not finite:
                what = f"the {task} loss is {loss.item()}"
            elif bad:
                what = "a loss on another rank is not finite"
            else:
                what = f"fp16 skipped {in_a_row} steps in a row for inf/NaN gradients"
            raise Diverged(f"training diverged at step {progress.step} (epoch {progress.epoch + 1}, task {task}): "
                           f"{what}; rates {current_rates(optimizer)}. The run folder keeps its last checkpoint; "
                           "start again with lower rates (--lr, --head-lr)")
        if progress.step % self.every == 0 or due or last:
            self.print_line(progress, optimizer)
        return signum

    def drain(self, progress):
        """The interval's losses as numbers, added to the epoch's running sum in progress. With several
        ranks each loss is the mean over ranks: the mean loss of the global batch."""
        losses = {task: distributed.mean(torch.stack(values), self.place).tolist()
                  for task, values in self.losses.items() if values}
        progress.loss_sum += sum(map(sum, losses.values()))
        progress.loss_count += sum(map(len, losses.values()))
        for values in self.losses.values():
            values.clear()
        return losses

    def print_line(self, progress, optimizer):
        losses = self.drain(progress)
        speed = self.interval_examples / (time.perf_counter() - self.interval_start)
        eta = seconds_left(self.work, progress, speed)
        shown = " ".join(f"{t} {sum(losses[t]) / len(losses[t]):.4f}" if t in losses else f"{t} -" for t in self.tasks)
        skipped = f" | {progress.skipped_steps} skipped steps" if self.place.amp_dtype is torch.float16 else ""
        log(f"step {progress.step}/{self.work.total_steps} | epoch {progress.epoch + 1} | loss {shown} | "
            f"{current_rates(optimizer)} | {speed:.1f} samples/s | ETA {duration(eta)}{skipped}", flush=True)
        self.interval_start, self.interval_examples = time.perf_counter(), 0
