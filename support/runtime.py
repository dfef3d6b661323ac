"""What every script needs at run time: one-line errors, the device and precision, the optimizer step, output.

The scripts import these from here, never from each other; every module
that writes a file (weights, checkpoints, caches, JSON) writes it through
atomic_write. Reading order: the errors a user can cause, and read_text ->
Place (device, autocast dtype, this process's rank) -> optimizer_step (the
one AMP path: unscale, clip, step, update) -> output: atomic_write, log
(print on the first process only), and Report, the progress line of every
long stage.
"""

import argparse
import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


# oneDNN, which runs bf16 matrix products on the CPU, keeps 1,024 built kernels by default, fewer than
# the shapes of a run in bf16 (model.Packing), and rebuilding one costs more than its product. Read
# when it builds its first kernel; a value set beforehand wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")
MAX_SEED = 2**32 - 1  # --seed: numpy's generators take no negative seed, torch none past 64 bits


class UsageError(Exception):
    """A bad flag or input; a script prints it as one line and exits with status 2."""


class DataError(ValueError):
    """An input file that cannot be used; the message is one line naming the file (and line)."""


class CheckpointError(ValueError):
    """A model folder or checkpoint that cannot be loaded; the message is one line naming the file."""


class Diverged(Exception):
    """Training diverged (a loss or weights that are NaN or infinite, or an fp16 loss scale that fell
    too low: step_log.StepLog.check_divergence): the run stops, with one line and exit status 2."""


def read_text(path):
    """The whole file as text, without a leading byte-order mark; a missing, binary or non-UTF-8 file is a
    DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `python download.py` first") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path}:{line}: binary data (a NUL byte), not a text file")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (spreadsheets write one) is not part of the text
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def check_arguments_utf8(texts, what):
    """Refuse a command-line text whose bytes are not UTF-8 with a UsageError that names it ("{what} N").
    Python hands such bytes on as surrogates (surrogateescape); encoding them back gives the bytes,
    which then fail to decode as UTF-8."""
    for n, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{what} {n}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None


def pick_device(name):
    """"auto" | "cpu" | "cuda" -> torch.device; asking for a missing GPU is a UsageError.

    On CUDA it also switches off cuDNN's attention kernels for this process:
    cuDNN builds an execution plan for every new shape of its inputs, and the
    batches here come in many widths (each padded to its own longest row), so
    it would plan anew on most steps. SDPA's other kernels need no plan
    (docs/multitask.md measures the difference).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for, but no CUDA device is available")
    if name == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return torch.device(name)


def pick_amp(amp, device):
    """--amp auto|fp16|bf16|off -> the autocast dtype, or None for fp32. auto: on the CPU, bf16
    where it multiplies bf16 natively (cpu_bf16), fp32 where bf16 would be emulated and slower."""
    if device.type == "cpu":
        if amp == "fp16":
            raise UsageError("argument --amp: fp16 needs a CUDA GPU (fp16 autocast with a GradScaler is the CUDA "
                             "path here); on the CPU use --amp bf16 or off")
        if amp == "auto":
            return torch.bfloat16 if cpu_bf16() else None
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


PRECISION_NAMES = {None: "fp32", torch.float16: "fp16 autocast + GradScaler", torch.bfloat16: "bf16 autocast"}


def cpu_bf16():
    """The CPU's instructions that multiply bf16 in hardware, by name, or None: AMX (Intel since
    Sapphire Rapids) or AVX512-BF16 (Intel since Cooper Lake, AMD since Zen 4). Read with torch's
    own CPU checks, torch.cpu._is_amx_tile_supported and _is_avx512_bf16_supported, which ask the
    CPU's feature flags. Not torch.backends.cpu.get_cpu_capability(): it names the vector width
    ("AVX512"), with or without bf16. Not oneDNN's torch.ops.mkldnn._is_mkldnn_bf16_supported():
    it is true wherever oneDNN can run bf16 at all, emulated included. Not a timed product: its
    answer would change with the machine's load, and a run's precision must not."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def describe_precision(place, amp):
    """The precision a run computes in, and on the CPU why, for the line at its start."""
    shown = PRECISION_NAMES[place.amp_dtype]
    if place.device.type != "cpu" or amp != "auto":
        return shown
    native = cpu_bf16()
    if native is None:
        return f"{shown} (--amp auto: this CPU has no bf16 instructions, so bf16 would be emulated and slower)"
    return f"{shown} (--amp auto: this CPU multiplies bf16 natively, {native}; --amp off for fp32)"


@dataclass(frozen=True)
class Place:
    """Where batches run: the device, the autocast dtype (None: fp32), and this process's
    share of the work (rank of world_size; 0 of 1 without torchrun)."""
    device: torch.device
    amp_dtype: torch.dtype = None
    rank: int = 0
    world_size: int = 1

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def scaler(self):
        """A GradScaler that works only for fp16, whose small range needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    def to_device(self, batch):
        """A collated batch's tensors on the device; on a GPU through pinned memory, without waiting."""
        pin = self.device.type == "cuda"
        return {k: (v.pin_memory().to(self.device, non_blocking=True) if pin else v) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def peak_memory_mb(self):
        """Peak GPU memory allocated, or on the CPU the process's largest resident size so far."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def optimizer_step(optimizer, scaler, clip):
    """Unscale, clip, step, update. Returns True if the step was skipped for inf/NaN gradients."""
    scaler.unscale_(optimizer)  # clipping must see the true gradients, not the scaled ones
    if clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips the step if any gradient is inf or NaN
    scaler.update()  # ... and then lowers the scale
    optimizer.zero_grad(set_to_none=True)
    return scaler.is_enabled() and scaler.get_scale() < scale


def atomic_write(path, write):
    """Call write(temporary path), then rename it over path: readers never see half a file.

    The temporary name holds the process id, so that processes writing the same
    file at once (ranks filling the data cache) do not write into each other's.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600; give every file the usual mode
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def os_error_line(e):
    """An OSError as the user should read it: the file, then what went wrong ("PATH: No space left on device")."""
    return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"


def exit_status_of(main):
    """A command-line tool's main() as an exit status, for what happens around the code rather than in it:
    the reader of its output going away (`| head`) is not an error (0); the environment failing (a full
    disk, a permission, a folder gone) is one line and 2; Ctrl-C is one line and 130. Anything else is
    a bug in this code and keeps its traceback. (train.py and pairs.py use run_folder.exit_status.)"""
    try:
        return main()
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped by signal 2", file=sys.stderr)
        return 130


def current_umask():
    """The process's umask. Reading it means setting it, so it is set straight back, with SIGINT and
    SIGTERM held off in between: a stop there must never leave the umask at 0."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        mask = os.umask(0)
        os.umask(mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return mask


def write_json(path, data, lines=False):
    """Write JSON (or JSON lines, one object per item) atomically. NaN and Infinity are not JSON: a
    score that is undefined is None (null), and a NaN that gets here is a bug (ValueError)."""
    text = ("".join(json.dumps(r, allow_nan=False) + "\n" for r in data) if lines
            else json.dumps(data, indent=2, allow_nan=False) + "\n")
    atomic_write(path, lambda tmp: tmp.write_text(text))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none to show: a default of None (the help
    says in words what happens) and an on/off switch (off unless given)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


def log(*args, **kwargs):
    """print(), on the first process only: under torchrun every process runs the same code, and one speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


def plural(n, word):
    """"1 epoch", "3 epochs", "1,200 pairs": a count and its noun."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def duration(seconds):
    """12m05s, or 1h02m past an hour."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Report:
    """Progress of one long stage (tokenizing, encoding features, an evaluation pass), as whole lines.

    update() prints a line when `every` seconds have passed since the last
    one: the count done, the rate and the ETA. Nothing is printed for a stage
    that ends sooner. When the cost of an item varies (long and short
    sentences), pass each item's cost, and the ETA follows the cost, not the
    count. Whole lines, not a line redrawn with "\\r": they read the same on a
    terminal, in a pipe and in a log file.
    """

    every = 10.0  # seconds between lines

    def __init__(self, what, total, unit="examples", total_cost=None):
        self.what, self.total, self.unit = what, total, unit
        self.total_cost = total_cost if total_cost is not None else total
        self.done = self.cost = 0
        self.start = self.last = time.perf_counter()

    def update(self, n, cost=None):
        self.done += n
        self.cost += n if cost is None else cost
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            seconds = now - self.start
            eta = seconds * max(self.total_cost - self.cost, 0) / max(self.cost, 1)
            log(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%}) | "
                     f"{self.done / seconds:,.0f} {self.unit}/s | ETA {duration(eta)}", flush=True)

    def seconds(self):
        return time.perf_counter() - self.start
