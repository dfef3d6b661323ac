"""Data-parallel training under torchrun: joining the process group, and every collective the run makes.

torchrun starts one process per GPU (or CPU worker) and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without those, the
run is one process and every function below returns at once.

A collective is a call that every rank must make, at the same point of the
run and in the same order; a rank that skips one leaves the others waiting
forever. So none of these calls may sit under a rank-dependent branch such
as `if rank == 0`: gather first on every rank, then let rank 0 write. The
collectives here, and where the scripts call them:

  wrap          building DistributedDataParallel (it broadcasts rank 0's weights);
                before the first epoch and after each gradual release
  agree         after every training step (step_log.py): did any rank get a stop
                signal? is a log line due? And after each epoch's checkpoint
  mean          at each log line: the global batch's losses
  sum_counts    at the end of each evaluation: correct predictions, entity counts
  rng_states    before each checkpoint: every rank's random-number state

DDP's own all-reduce of the gradients runs inside backward().

Which process writes files: rank 0 writes the run folder (run_folder.py);
every rank may write the shared caches under DATA/.cache (the tokenized
files and the frozen-backbone features), each file atomically.
"""

import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from support.runtime import Place, pick_amp, pick_device

_CONTROL = None  # a gloo group for small host-side decisions (agree): agreeing on one number needs no GPU sync


def init(device_name, amp):
    """The Place of this process: device, precision (--amp), rank and world size. Under torchrun, join the
    process group first: NCCL with one GPU per process (GPU number LOCAL_RANK), or gloo on CPUs."""
    global _CONTROL
    device = pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Place(device, pick_amp(amp, device))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() > 1:
        _CONTROL = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return Place(device, pick_amp(amp, device), dist.get_rank(), dist.get_world_size())


def close():
    """Leave the process group (every rank, at the end of the run).

    Collect garbage first: the run's objects can sit in reference cycles (a
    frame of torch's optimizer set-up keeps the set-up's locals), which keep
    DDP, and with it the process group, alive. Freed only at interpreter
    exit, after the group is destroyed, DDP can abort the process as gloo's
    threads are torn down ("terminate called without an active exception").
    """
    global _CONTROL
    _CONTROL = None
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def describe(place):
    """', process group nccl, world size 2' for the log line of the set-up; '' in a single process."""
    return f", process group {dist.get_backend()}, world size {place.world_size}" if dist.is_initialized() else ""


def wrap(module, place):
    """module in DistributedDataParallel, which averages gradients over ranks during backward.

    Every rank runs the same task at the same step (data.MultiTaskSampler), so
    the other task's head has no gradient on every rank alike, and
    find_unused_parameters lets DDP finish the step without those gradients,
    at the cost of one walk over the autograd graph per step. DDP fixes its
    parameter list when built: after releasing frozen parameters, wrap again.
    A module with nothing to train is returned as it is.
    """
    if place.world_size == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    return DistributedDataParallel(module, device_ids=[place.device] if place.device.type == "cuda" else None,
                                   find_unused_parameters=True)


def agree(numbers, place):
    """Per position, the largest of the ranks' numbers (a signal number, 0 for none; 1 if a log line is due), on every rank."""
    if place.world_size == 1:
        return numbers
    t = torch.tensor(numbers)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return t.tolist()


def mean(values, place):
    """The mean over ranks of a tensor holding the same quantities on every rank (summed, divided by W)."""
    if place.world_size > 1:
        dist.all_reduce(values)
        values /= place.world_size
    return values


def sum_counts(counts, place):
    """A list of integers summed over ranks."""
    if place.world_size == 1:
        return counts
    summed = torch.tensor(counts, dtype=torch.int64, device=place.device)
    dist.all_reduce(summed)  # SUM
    return summed.tolist()


def rng_states(place):
    """Every rank's random-number states, as a list by rank on rank 0 (None on the others)."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if place.world_size == 1:
        return [mine]
    gathered = [None] * place.world_size
    dist.all_gather_object(gathered, mine)
    return gathered if place.rank == 0 else None
