"""What --resume needs: the checkpoint's contents, writing it atomically, reading it back, and the resume checks.

A run keeps one file, OUT/checkpoint/checkpoint.safetensors, rewritten
after every epoch and when a signal stops the run (rank 0 writes it, through
run_folder.RunFolder.save_checkpoint):

  tensors   model.<name>            the model's state dict (MultiTaskModel, or pairs.py's PairModel)
            optim.<index>.<key>     AdamW's state per parameter (step, exp_avg, exp_avg_sq)
            rng.<kind>[.<rank>]     random-number states: rng.torch and rng.cuda for rank 0,
                                    rng.torch.1 ... for the other ranks
  metadata  state                   Progress (below), as JSON
            param_groups            the optimizer's groups (name, rates, parameter indices), as JSON
            scaler                  the GradScaler's state, as JSON
            fingerprint             what the run was made from: the data and the pretrained model,
                                    each as its resolved folder and a sha256 of its contents, as JSON
            format                  FORMAT, the version of this layout
            sha256                  a checksum of every tensor (name, dtype, shape, bytes) and of
                                    the metadata above

Only safetensors and JSON: nothing is unpickled. read() verifies the format
and the checksum, so a damaged or foreign file is refused with one line
(CheckpointError) rather than resumed; --resume then checks that the flags
and the fingerprint are the saved run's. A resumed run takes the same steps
on the same batches with the same random numbers as one that never stopped
(tests/test_train.py checks it loss by loss).
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from support.runtime import CheckpointError, UsageError, atomic_write, log


@dataclass
class Progress:
    """Where a run stands: the counters the loop updates, saved as JSON in every checkpoint."""
    flags: dict  # the run's flags (vars(args)); "run" in the file
    world_size: int = 1  # processes that wrote it; a resume needs as many, so the global batches stay the same
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch done; 0 between epochs
    step: int = 0  # training steps taken, over all epochs
    best: dict = None  # {"score": the best epoch's validation score, "epoch": its epoch}; train.py's score is
    #                    the mean of AG accuracy and entity F1, pairs.py's the dev Spearman
    history: list = field(default_factory=list)  # one record per validation pass, as in metrics.jsonl
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped for inf/NaN gradients
    precision: str = None  # what the steps ran in (runtime.PRECISION_NAMES): a resume must run in the same
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    eval_examples: int = 0  # examples evaluated so far: with eval_seconds, the rate behind the ETA
    loss_sum: float = 0.0  # the current epoch's logged training losses so far, for its mean
    loss_count: int = 0
    interval_losses: list = field(default_factory=list)  # the epoch's rows: {"step", mean loss per task} every
    #                                                       --log-every steps and at its end (metrics.jsonl)
    pending_losses: dict = field(default_factory=dict)  # task -> [sum, count] of the losses since the last row


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, in memory."""
    progress: Progress
    model: dict  # name -> tensor
    optimizer: dict  # torch's optimizer state_dict: {"state": {index: {key: tensor}}, "param_groups": [...]}
    scaler: dict  # GradScaler.state_dict()
    rng: list  # per rank: {"torch": state, "cuda": state (where CUDA is present)}
    fingerprint: dict = field(default_factory=dict)  # {"data": {"path", "sha256"}, "model": {"path", "sha256"}}
    path: Path = None  # the file it was read from (read)


FORMAT = "2"  # 2: a format version, a checksum and a fingerprint; 1 (no "format" entry) had none of them


def checksum(tensors, metadata):
    """sha256 of every tensor (name, dtype, shape, bytes, in name order) and of the metadata but its own entry."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(f"{key}={metadata[key]};".encode())
    return h.hexdigest()


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
    state = {"run" if k == "flags" else k: v for k, v in asdict(ckpt.progress).items()}  # its name in format 2
    metadata = {"state": json.dumps(state, allow_nan=False),  # NaN is not JSON: a bug if it gets here
                "param_groups": json.dumps(ckpt.optimizer["param_groups"]),
                "scaler": json.dumps(ckpt.scaler), "fingerprint": json.dumps(ckpt.fingerprint), "format": FORMAT}
    metadata["sha256"] = checksum(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read(path):
    """The Checkpoint in a file, verified; CheckpointError, naming the file, for anything else."""
    try:
        with safe_open(path, "pt") as f:
            metadata, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:  # cut, overwritten or unreadable
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None
    if "state" not in metadata:
        raise CheckpointError(f"{path}: not a checkpoint of this program (no run state in it)")
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {metadata.get('format', '1')}, this program reads "
                              f"format {FORMAT}; start the run again in a new --out")
    if metadata.get("sha256") != checksum(tensors, metadata):
        raise CheckpointError(f"{path}: checksum mismatch: the file was changed or damaged after it was written")
    try:
        ckpt = _unpack(metadata, tensors)
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a checksummed file of another layout
        raise CheckpointError(f"{path}: not a checkpoint of this program ({e!r})") from None
    ckpt.path = Path(path)
    return ckpt


def saved_flags(path):
    """The flags of the run a checkpoint holds, with --data and --model as the resolved folders of its
    fingerprint (the flags hold them as typed, relative to where the run started), from its metadata
    alone: read() checks the whole file when the run resumes. A missing file is a UsageError; a
    damaged or foreign one the CheckpointError read() raises."""
    if not Path(path).exists():
        raise UsageError(f"argument --resume: {path} not found")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        folders = {what: where["path"] for what, where in json.loads(metadata["fingerprint"]).items()}
        return {**upgrade_flags(json.loads(metadata["state"])["run"]), **folders}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        read(path)  # raises CheckpointError, saying what is wrong with the file
        raise


def _unpack(metadata, tensors):
    """The Checkpoint in a verified file's metadata and tensors."""
    state = json.loads(metadata["state"])
    _without_nan(state)
    progress = Progress(flags=state.pop("run"), **state)
    groups, scaler = json.loads(metadata["param_groups"]), json.loads(metadata["scaler"])
    state, rng = {}, [{} for _ in range(progress.world_size)]
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        elif key.startswith("rng."):
            _, kind, *rank = key.split(".")
            rng[int(rank[0]) if rank else 0][kind] = value
    missing = [f"rng.torch{f'.{r}' if r else ''}" for r, states in enumerate(rng) if "torch" not in states]
    if missing:
        raise KeyError(", ".join(missing))
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(progress, model, {"state": state, "param_groups": groups}, scaler, rng,
                      json.loads(metadata["fingerprint"]))


# Flags that may change between a run and its --resume; every other flag must stay the same.
RESUME_MAY_CHANGE = {"out", "resume", "stop_after", "log_every", "no_data_cache", "no_feature_store",
                     "feature_store_limit_mb", "feature_cache_limit_mb", "device", "compile"}
# Folders: compared by check_fingerprint, as resolved paths and by their contents, not as the text given.
FOLDER_FLAGS = {"data", "model"}


# --- Compatibility: checkpoints that earlier versions wrote ---------------------------------

# Flags added after checkpoints were already written: a checkpoint without one ran as this value does.
ADDED_FLAGS = {"loss_norm": "batch", "valid_fraction": 0.05, "tasks": "ag,ner", "task_lr": {}, "sampling": "min",
               "loss_weight": {}}
RENAMED_FLAGS = {"ag_valid_fraction": "valid_fraction"}  # a checkpoint's flag under its former name -> its name now


def upgrade_flags(flags):
    """A checkpoint's flags as this version names them: renamed ones under their names now, added ones
    at the value that the run ran as."""
    return {**ADDED_FLAGS, **{RENAMED_FLAGS.get(k, k): v for k, v in flags.items()}}


def _without_nan(state):
    """A run state written before NaN was kept out of JSON may hold one: an undefined score becomes None,
    a best epoch whose score was undefined no best epoch, and an epoch's loss sum that is not a number
    starts again."""
    for record in state["history"]:
        record.update({k: None for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)})
    if state.get("best") and not math.isfinite(state["best"]["score"]):
        state["best"] = None
    if not math.isfinite(state.get("loss_sum", 0.0)):
        state["loss_sum"], state["loss_count"] = 0.0, 0


def check_resume(path, progress, flags, world_size):
    """--resume continues the same run: the flags that shape it, and the number of processes, must be unchanged."""
    saved = upgrade_flags(progress.flags)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in flags.items()
               if k not in RESUME_MAY_CHANGE | FOLDER_FLAGS and saved.get(k) != v]
    if changed:
        raise CheckpointError(f"{path}: --resume needs the flags of the saved run; changed: {'; '.join(changed)}")
    if progress.world_size != world_size:
        raise CheckpointError(f"argument --resume: {path} was written by {progress.world_size} processes, this "
                              f"run has {world_size}; resume with the same number, so that the global batches "
                              "stay the same")


def weights_hash(model):
    """sha256 of the backbone's config and tensors, everything a feature depends on besides the data."""
    h = hashlib.sha256(json.dumps(asdict(model.bert.config), sort_keys=True).encode())
    for name, tensor in sorted(model.bert.state_dict().items()):
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(data_dir, sources, model_dir, model_sha256):
    """What a run is made from: each folder, resolved, with a sha256 of what was read from it. sources:
    {split name: the fingerprint of its file and tokenization (TaskData.source)}."""
    data_sha256 = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()
    return {"data": {"path": str(Path(data_dir).resolve()), "sha256": data_sha256},
            "model": {"path": str(Path(model_dir).resolve()), "sha256": model_sha256}}


def check_fingerprint(path, saved, current):
    """--resume continues a run on the same data and the same pretrained model: the same folders
    (resolved: another path to the same folder is fine) with the same contents."""
    changed = [f"--{what} {saved[what]['path']} -> {current[what]['path']}" for what in ("data", "model")
               if saved[what]["path"] != current[what]["path"]]
    changed += [f"the contents of --{what} (sha256 {saved[what]['sha256'][:12]} -> {current[what]['sha256'][:12]})"
                for what in ("data", "model") if saved[what]["sha256"] != current[what]["sha256"]]
    if changed:
        raise CheckpointError(f"{path}: --resume needs the data and model of the saved run; changed: "
                              f"{'; '.join(changed)}")


def restore(ckpt, path, model, optimizer, scaler, rank=0):
    """Load ckpt into the model, optimizer, scaler and this rank's random-number generators; returns its Progress."""
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    groups = ckpt.optimizer["param_groups"]
    if [g["name"] for g in groups] != [g["name"] for g in optimizer.param_groups]:
        raise CheckpointError(f"{path}: its optimizer groups do not match this run's flags")
    try:
        optimizer.load_state_dict(ckpt.optimizer)
        scaler.load_state_dict(ckpt.scaler)
        torch.set_rng_state(ckpt.rng[rank]["torch"])
        if "cuda" in ckpt.rng[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.rng[rank]["cuda"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its optimizer, scaler or random state does not fit this run ({e!r})") from None
    return ckpt.progress


def epochs_begun(saved):
    """How many epochs a saved run had begun: those it finished, + 1 if it stopped in the middle of one;
    0 for a new run (saved None). Gradual unfreezing released a layer in each after the first."""
    return 0 if saved is None else saved.progress.epoch + (saved.progress.batch > 0)


def start(args, place, model, optimizer, sources, saved):
    """Where a run starts, in train.py and pairs.py alike: its GradScaler (on for fp16 only), its Progress,
    and the fingerprint of the data and model it is made from (sources: {split name: its data's
    source}). With --resume (saved: the Checkpoint run_folder.claim read), the fingerprint must match,
    and the model, optimizer, scaler and random state are restored where they stood. Under torchrun,
    each rank's dropout is seeded apart. Returns (scaler, progress, fingerprint)."""
    scaler = place.scaler()
    if place.world_size > 1:
        torch.manual_seed(args.seed + 1_000_003 * place.rank)  # different dropout on each rank
    progress = Progress(flags=vars(args), world_size=place.world_size)
    fingerprint_now = fingerprint(args.data, sources, args.model, weights_hash(model))  # before any step
    if saved is not None:
        check_fingerprint(saved.path, saved.fingerprint, fingerprint_now)
        progress = restore(saved, saved.path, model, optimizer, scaler, place.rank)
        progress.flags = vars(args)
        log(f"resumed from {saved.path}: epoch {progress.epoch + 1}, batch {progress.batch}, step {progress.step}")
    return scaler, progress, fingerprint_now
