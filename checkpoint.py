"""What --resume needs: the checkpoint's contents, writing it atomically, reading it back, and the resume checks.

A run keeps one file, OUT/checkpoint/checkpoint.safetensors, rewritten
after every epoch and when a signal stops the run:

  tensors   model.<name>            the model's state dict (MultiTaskModel, or pairs.py's PairModel)
            optim.<index>.<key>     AdamW's state per parameter (step, exp_avg, exp_avg_sq)
            rng.<kind>[.<rank>]     random-number states: rng.torch and rng.cuda for rank 0,
                                    rng.torch.1 ... for the other ranks
  metadata  state                   Progress (below), as JSON
            param_groups            the optimizer's groups (name, rates, parameter indices), as JSON
            scaler                  the GradScaler's state, as JSON

Only safetensors and JSON: nothing is unpickled. A resumed run takes the same
steps on the same batches with the same random numbers as one that never
stopped (tests/test_train.py checks it loss by loss).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import CheckpointError
from runtime import atomic_write


@dataclass
class Progress:
    """Where a run stands: the counters the loop updates, saved as JSON in every checkpoint."""
    run: dict  # the run's flags (vars(args))
    world_size: int = 1  # processes that wrote it; a resume needs as many, so the global batches stay the same
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done; 0 between epochs
    step: int = 0  # training steps taken, over all epochs
    best: dict = None  # {"score": the job's score on validation, "epoch": its epoch}; train.py's score is the
    #                    mean of AG accuracy and entity F1, pairs.py's the dev Spearman
    history: list = field(default_factory=list)  # one record per validation pass, as in metrics.jsonl
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped for inf/NaN gradients
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    eval_examples: int = 0  # examples evaluated so far: with eval_seconds, the rate behind the ETA
    loss_sum: float = 0.0  # the current epoch's logged training losses so far, for its mean
    loss_count: int = 0


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, in memory."""
    progress: Progress
    model: dict  # name -> tensor
    optimizer: dict  # torch's optimizer state_dict: {"state": {index: {key: tensor}}, "param_groups": [...]}
    scaler: dict  # GradScaler.state_dict()
    rng: list  # per rank: {"torch": state, "cuda": state (where CUDA is present)}


def path_in(out):
    return Path(out) / "checkpoint" / "checkpoint.safetensors"


def save(path, ckpt):
    """Write ckpt to path atomically: a temporary file, then a rename, so a crash never leaves half a file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ckpt.model.items()}
    for index, values in ckpt.optimizer["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    for rank, states in enumerate(ckpt.rng):
        for kind, value in states.items():
            tensors[f"rng.{kind}" + (f".{rank}" if rank else "")] = value
    metadata = {"state": json.dumps(asdict(ckpt.progress)), "param_groups": json.dumps(ckpt.optimizer["param_groups"]),
                "scaler": json.dumps(ckpt.scaler)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read(path):
    """The Checkpoint in a file; CheckpointError if it cannot be read."""
    try:
        with safe_open(path, "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        progress = Progress(**json.loads(metadata["state"]))
        groups, scaler = json.loads(metadata["param_groups"]), json.loads(metadata["scaler"])
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a checkpoint of this program ({e!r})") from None
    state, rng = {}, [{} for _ in range(progress.world_size)]
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        elif key.startswith("rng."):
            _, kind, *rank = key.split(".")
            rng[int(rank[0]) if rank else 0][kind] = value
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(progress, model, {"state": state, "param_groups": groups}, scaler, rng)


# Flags that may change between a run and its --resume; every other flag must stay the same.
RESUME_MAY_CHANGE = {"out", "resume", "stop_after", "log_every", "no_data_cache", "no_feature_store",
                     "feature_store_limit_mb", "feature_cache_limit_mb", "device", "compile"}


def check_resume(path, progress, flags, world_size):
    """--resume continues the same run: the flags that shape it, and the number of processes, must be unchanged."""
    saved = progress.run
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in flags.items()
               if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if changed:
        raise CheckpointError(f"{path}: --resume needs the flags of the saved run; changed: {'; '.join(changed)}")
    if progress.world_size != world_size:
        raise CheckpointError(f"argument --resume: {path} was written by {progress.world_size} processes, this "
                              f"run has {world_size}; resume with the same number, so that the global batches "
                              "stay the same")


def restore(ckpt, path, model, optimizer, scaler, rank=0):
    """Load ckpt into the model, optimizer, scaler and this rank's random-number generators; returns its Progress."""
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    groups = ckpt.optimizer["param_groups"]
    if [g["name"] for g in groups] != [g["name"] for g in optimizer.param_groups]:
        raise CheckpointError(f"{path}: its optimizer groups do not match this run's flags")
    optimizer.load_state_dict(ckpt.optimizer)
    scaler.load_state_dict(ckpt.scaler)
    torch.set_rng_state(ckpt.rng[rank]["torch"])
    if "cuda" in ckpt.rng[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt.rng[rank]["cuda"])
    return ckpt.progress
