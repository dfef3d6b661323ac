"""The run folder (--out), and how a run ends: the folder made and locked, what is written into it, stop signals.

A run is one training job of train.py or pairs.py, from its first step to
its summary, however many times it is stopped and resumed (--resume); its
folder holds everything it writes. The scripts call these explicitly:

    folder, saved = claim(args, place)     # made and locked; with --resume, the checkpoint read and checked
    folder.write_json / save_model / save_checkpoint    # rank 0 writes, others skip
    folder.restore_best(model, progress, weights)        # the best epoch's weights, for the test
    summary(...)                           # the fields every summary.json has
    with StopSignals() as stop: ...        # in the loop: SIGINT/SIGTERM set stop.signum, the step finishes
    with signals_raise_stopped(): ...      # elsewhere: they raise Stopped
    stopped(signum, out, when)             # a signal in the loop: the line, and the exit status
    exit_status(error, out)                # every way a run ends -> an exit status and one line
    release()                              # as the script ends: unlock, and remove a folder left empty

A lock is an flock() on OUT/.lock, held by rank 0 while the run goes; it
belongs to the open file and ends with the process, however the process
ends, so a crashed run leaves no stale lock behind.
"""

import contextlib
import fcntl
import os
import signal
import socket
import sys
import time
from pathlib import Path

from safetensors import SafetensorError

from support import checkpoint
from support import distributed
from support import interop
from support.checkpoint import Checkpoint
from support.model_folder import copy_tokenizer, load_trained, save_trained
from support.runtime import PRECISION_NAMES, CheckpointError, DataError, Diverged, UsageError, log, os_error_line, write_json

_HELD = []  # the open lock files: a lock lasts as long as its file stays open, so until the process ends
_MADE = []  # the run folders this process made: removed again if it ends having written nothing there


class RunFolder:
    """The folder of a run, as its ranks see it: rank 0 writes every file, the other ranks' calls do nothing."""

    def __init__(self, path, place, flags):
        self.path, self.place, self.flags = Path(path), place, flags  # flags: vars(args), stored with the model
        self.checkpoint = checkpoint.path_in(self.path)

    def write_json(self, name, data, lines=False):
        if self.place.rank == 0:
            write_json(self.path / name, data, lines)

    def save_model(self, model):
        """The model (model_folder.save_trained) with the run's flags under "run" in config.json, the
        pretrained folder's tokenizer files, and for a sentence vector (train.py's, a bi-encoder's) its
        sentence-transformers modules (interop.write_modules): OUT is a complete model folder for
        predict.py and embed.py, and for sentence-transformers and transformers."""
        if self.place.rank == 0:
            if model.settings().get("kind") != "cross":  # train.py's model and a bi-encoder have a sentence vector
                interop.write_modules(self.path, model.encoder, self.flags["max_len"])
            save_trained(model, self.path, extra={"run": self.flags})
            copy_tokenizer(self.flags["model"], self.path, self.flags["max_len"])

    def restore_best(self, model, progress, best_weights):
        """Put the best epoch's weights back into model for the test: best_weights, kept in memory, or
        those in OUT where the run was resumed after its best epoch (every rank reads them). A run in
        which nothing trained keeps the model as it is, and saves it."""
        if progress.best is None:
            self.save_model(model)
        elif best_weights is not None:
            model.load_state_dict(best_weights)
        else:
            model.load_state_dict(load_trained(self.path, type(model)).state_dict())

    def save_checkpoint(self, progress, model, optimizer, scaler, fingerprint):
        """Everything --resume needs (checkpoint.Checkpoint). Call it on every rank: each hands in its
        random-number state (distributed.rng_states, a collective); rank 0 writes."""
        rngs = distributed.rng_states(self.place)
        progress.precision = PRECISION_NAMES[self.place.amp_dtype]
        if self.place.rank == 0:
            checkpoint.save(self.checkpoint, Checkpoint(progress, model.state_dict(), optimizer.state_dict(),
                                                        scaler.state_dict(), rngs, fingerprint))


def epochs_to_run(progress, args):
    """The epochs this invocation trains, from where the run stands to the last (--epochs), or only the
    next N of them with --stop-after N (an epoch a signal cut short counts as one): a job script that
    repeats `--resume --stop-after N` trains N epochs per time slot."""
    done, last = progress.epoch, args.epochs
    return range(done, last if args.stop_after is None else min(done + args.stop_after, last))


def summary(progress, flags, place, model, started, data_seconds):
    """What every summary.json holds after a script's scores: the best epoch, the flags, the device and
    precision, the timings, the parameter counts, the fp16 steps skipped, the peak memory."""
    return {"best_epoch": progress.best and progress.best["epoch"], "config": flags, "device": str(place.device),
            "precision": PRECISION_NAMES[place.amp_dtype],
            "timings_s": {"data": round(data_seconds, 2), "train": round(progress.train_seconds, 2),
                          "eval": round(progress.eval_seconds, 2), "total": round(time.perf_counter() - started, 2)},
            "parameters": {"total": sum(p.numel() for p in model.parameters()),
                           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "skipped_steps": progress.skipped_steps, "peak_memory_mb": round(place.peak_memory_mb(), 1)}


def claim(args, place):
    """The run folder, made and locked, and with --resume the checkpoint in it, read and checked against
    the flags. Sets args.out to the folder chosen. Returns (RunFolder, saved Checkpoint or None).

    A new run takes a new or empty folder only: a folder that holds anything else (a pretrained model,
    a finished run, any file) is refused before anything is written into it, so nothing is replaced."""
    if place.world_size > 1 and args.out is None:
        raise UsageError("argument --out: give --out under torchrun, so that every process uses the same folder")
    out = Path(args.out) if args.out else new_run_folder()
    args.out = str(out)  # the folder chosen, as the run's flags, summary.json and any hint name it
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {out} is a file, not a folder")
    if args.resume and not checkpoint.path_in(out).exists():
        raise UsageError(f"argument --resume: {checkpoint.path_in(out)} not found")
    if not args.resume and (held := contents(out)):
        raise UsageError(f"argument --out: {out} {held}")
    try:
        out.mkdir(parents=True)
        if place.rank == 0:
            _MADE.append(out)
    except FileExistsError:  # an empty folder, a run to --resume, or made a moment ago by another rank
        pass
    except OSError as e:
        raise UsageError(f"argument --out: cannot create {out} ({e.strerror})") from None
    if place.rank == 0:  # the process that writes holds the folder; the other ranks of its job join it
        lock_folder(out)
    folder, saved = RunFolder(out, place, vars(args)), None
    if args.resume:
        saved = checkpoint.read(folder.checkpoint)
        checkpoint.check_resume(folder.checkpoint, saved.progress, vars(args), place.world_size)
        precision = PRECISION_NAMES[place.amp_dtype]
        if saved.progress.precision not in (None, precision):  # None: written before it was recorded
            raise CheckpointError(f"{folder.checkpoint}: the run trained in {saved.progress.precision}, and this one "
                                  f"would in {precision} (--device {args.device}, --amp {args.amp}); resume it on "
                                  "the same device and precision")
        if (out / "summary.json").exists():
            raise UsageError(f"argument --resume: {out} holds a finished run (summary.json): there is nothing "
                             "left to train")
    return folder, saved


def contents(out):
    """What a folder holds that a new run must not replace, in words, or "" for a new or empty folder
    (a .lock alone is left by a run that ended, or by another rank of this one)."""
    names = [p.name + "/" * p.is_dir() for p in out.iterdir() if p.name != ".lock"] if out.is_dir() else []
    names.sort(key=lambda name: (name[:1].isdigit(), name))  # sentence-transformers' module folders (1_Pooling/)
    # last: they only repeat, for that library, what the other files hold
    if not names:
        return ""
    if checkpoint.path_in(out).exists() and "summary.json" not in names:
        return "already holds a run; add --resume to continue it, or choose another --out"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    what = ("a finished run" if "summary.json" in names else "a model" if "model.safetensors" in names
            or "config.json" in names else "other files")
    return f"holds {what} ({shown}); a new run needs a new or empty folder: choose another --out"


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


def lock_folder(out):
    """Take OUT/.lock for this process, or raise UsageError naming the process that holds it."""
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
    _HELD.append((out, handle))


def release():
    """As a script ends: remove the run folders this process made but wrote nothing into (a run refused
    or stopped during set-up leaves no empty folder), and the lock file of a folder it held and left
    otherwise empty; then release every lock (the process's end would release them too)."""
    for out, handle in _HELD:
        with contextlib.suppress(OSError):  # gone already, or not ours to change: leave it
            if {p.name for p in out.iterdir()} == {".lock"}:
                (out / ".lock").unlink()  # still held: no other run can be starting in it
    while _MADE:
        with contextlib.suppress(OSError):  # not empty: it holds what the run wrote
            _MADE.pop().rmdir()
    while _HELD:
        _HELD.pop()[1].close()


# --- Stop signals and exit status -----------------------------------------------------------

@contextlib.contextmanager
def _on_stop_signals(handler):
    """SIGINT and SIGTERM call handler(signum, frame) inside the block; the previous handlers come back after."""
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class StopSignals:
    """Inside the training loop: SIGINT and SIGTERM set .signum instead of stopping the process, so
    that the step in progress finishes and the loop can save a checkpoint and return 128 + signum."""

    def __init__(self):
        self.signum = 0
        self._handlers = _on_stop_signals(lambda received, _: setattr(self, "signum", received))

    def __enter__(self):
        self._handlers.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handlers.__exit__(*exc)


class Stopped(Exception):
    """SIGINT or SIGTERM outside the training loop: in set-up, a feature build, the final evaluation."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stopped(signum, out, when):
    """A run stopped by signal signum `when` ("after epoch 2"), its checkpoint saved: the line that says
    how to continue. Returns the exit status, 128 + signum."""
    log(f"stopped by signal {signum} {when}: checkpoint saved; continue with --out {out} --resume", file=sys.stderr)
    return 128 + signum


def paused(epochs_done, out):
    """A run stopped by --stop-after, its checkpoint saved: the line that says how to continue.
    Returns the exit status, 0."""
    log(f"stopping after epoch {epochs_done} (--stop-after); continue with --out {out} --resume")
    return 0


def _raise_stopped(signum, _):
    raise Stopped(signum)


def signals_raise_stopped():
    """A block in which SIGINT and SIGTERM raise Stopped (the loop's StopSignals take over inside it)."""
    return _on_stop_signals(_raise_stopped)


def exit_status(error, out):
    """The exit status of a run that ended with `error`, after printing at most one line: 2 for bad
    input (UsageError, DataError, CheckpointError), a run that diverged (Diverged) or a failing
    environment (a full disk, a permission, a folder gone); 128 + n for signal n, with what to do next.
    Anything else is a bug in this code, and is raised again with its traceback."""
    if isinstance(error, Diverged):  # every rank found it at the same step: the first one says so
        log(f"error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, (UsageError, DataError, CheckpointError)):
        line, status = f"error: {error}", 2
    elif isinstance(error, OSError):
        line, status = f"error: {os_error_line(error)}", 2
    elif isinstance(error, SafetensorError):  # raised for write failures too, a full disk among them
        line, status = f"error: a safetensors file could not be written or read ({error}); is the disk full?", 2
    elif isinstance(error, Stopped):
        saved = out is not None and checkpoint.path_in(out).exists()
        line = f"stopped by signal {error.signum}; " + (
            f"continue from the last checkpoint with --out {out} --resume" if saved
            else "no checkpoint was written yet: start the run again")
        status = 128 + error.signum
    else:
        raise error
    print(line, file=sys.stderr)
    return status
