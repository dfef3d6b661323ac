"""The flags train.py and pairs.py share, and their checks: each script adds these groups, then its own flags.

Reading order: add_freeze_flags, add_feature_store_flags, add_rate_flags,
add_run_flags, add_multitask_flags (each adds flags to an argparse group,
with defaults a script may change) -> Renamed, a flag that was renamed -> resolve_defaults (--lr auto, --lr-decay auto, and
the sentence flags a sentence-transformers folder gives) ->
check_flags (what a parser cannot see; UsageError names the flag) ->
freeze_plan (--freeze and --unfreeze as a freeze.Plan).
"""

import argparse
import contextlib
import math
import sys
from pathlib import Path

from support import checkpoint
import freeze
from support import interop
from data import SAMPLING
from lr import AUTO, EMBEDDINGS_SHARE, auto_decay, auto_top_rate
from model import UNPAD
from support.model_folder import cross_encoder_note
from support.runtime import MAX_SEED, CheckpointError, UsageError
from support.tasks import Task


def add_freeze_flags(group, strategies):
    group.add_argument("--freeze", default="none", help=f"{strategies}, or a comma list")
    group.add_argument("--unfreeze", choices=("none", "gradual"), default="none",
                       help="gradual: start with the backbone frozen, release one layer per epoch from the top")


def add_feature_store_flags(group):
    """train.py's flags for a frozen backbone's outputs (features.py), and the old names of two of them."""
    group.add_argument("--no-feature-store", action="store_true",
                       help="with the whole backbone frozen, run it on every step instead of computing its outputs once")
    group.add_argument("--feature-store-limit-mb", type=int, default=4096,
                       help="largest frozen-backbone feature store to keep on the training device; past it, none")
    group.add_argument("--feature-cache-limit-mb", type=int, default=10240,
                       help="disk space for frozen-backbone features kept in DATA/.cache/features for later runs "
                            "(least recently used go first; 0: store none)")
    group.add_argument("--no-cache", action=Renamed, hint="use --no-feature-store (the frozen backbone's outputs) "
                                                          "or --no-data-cache (tokenized data)")
    group.add_argument("--cache-limit-mb", action=Renamed, hint="use --feature-store-limit-mb")


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
                       help="auto: bf16 on GPUs that have it, else fp16; on the CPU bf16 where it multiplies "
                       "bf16 natively (AMX, AVX512-BF16), else off (fp32)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda where there is one")
    group.add_argument("--unpad", choices=UNPAD, default="auto",
                       help="compute only the real tokens of batches with padding (model.Packing): always, never, "
                            "or auto: on the CPU, where it is measured faster (docs/performance.md)")
    group.add_argument("--seed", type=int, default=0, help=f"seeds heads, dropout and batch order (0 to {MAX_SEED})")
    group.add_argument("--limit", type=int, default=None, help="use at most N examples per task and split")
    group.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    if data_cache:
        group.add_argument("--no-data-cache", action="store_true", help="do not cache tokenized data in DATA/.cache")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoint; the flags it was started with are the "
                            "defaults (but --stop-after), and a flag given as well must equal the saved one, but for "
                            "--device, --compile, --log-every and the cache flags")
    group.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="train at most N epochs in this invocation, then save a checkpoint and stop (an epoch "
                            "a signal cut short counts as one); repeating the same command with --resume trains N "
                            "more each time, e.g. one time slot of a job queue each")


def add_multitask_flags(group):
    """train.py's flags for how the tasks share the run: their sampling and loss weights, the loss's
    divisor, the validation split of a task without one, and the batches' shapes."""
    group.add_argument("--loss-norm", choices=("batch", "fixed"), default="batch",
                       help="what divides a batch's summed loss: batch: its own label count (the mean); fixed: the "
                            "label count of an average batch of the task, so that every labelled word weighs the "
                            "same in short and long batches")
    group.add_argument("--valid-fraction", "--ag-valid-fraction", type=float, default=Task.valid_fraction,
                       help="share of train held out as the validation split of a task without one, as AG "
                            "News (fixed rows; a larger share holds out a superset)")
    group.add_argument("--sampling", default="min", metavar="|".join(SAMPLING),
                       help="the tasks' shares of an epoch of tasks x the smallest task's size (data."
                            "MultiTaskSampler): min: equal; proportional: p ~ size; temperature:T: p ~ "
                            "size^(1/T); annealed: from proportional towards uniform over the epochs")
    group.add_argument("--loss-weight", type=task_values, default={}, metavar="NAME=W,...",
                       help="a task's loss is multiplied by W (default 1)")
    group.add_argument("--group-window", type=int, default=50,
                       help="sort by length inside windows of this many batches to cut padding (0: off)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the encoder; batches are then padded to a multiple of 8 tokens, "
                            "so that only a few shapes are compiled")


def parse(parser, argv):
    """The flags in argv. --model's default follows --data: DATA/bert-base-uncased. With --resume, the
    run's flags are the defaults its checkpoint holds (--data and --model as the resolved folders), so
    that `--out R --resume` alone continues it as it ran; a flag given as well must equal the saved one,
    but for those a resume may change (checkpoint.RESUME_MAY_CHANGE: --device, --log-every, ...).
    --stop-after is for one invocation and is not carried over. (A checkpoint that cannot be read, or
    another script's, is left to check_flags, which says so in one line.)"""
    args = parser.parse_args(argv)
    if args.resume and args.out is not None:
        with contextlib.suppress(UsageError, CheckpointError):
            saved = checkpoint.saved_flags(checkpoint.path_in(args.out))
            parser.set_defaults(**{flag: value for flag, value in saved.items()
                                   if flag in vars(args) and flag not in ("out", "resume", "stop_after")})
            args = parser.parse_args(argv)
    if args.model is None:
        args.model = str(Path(args.data) / "bert-base-uncased")
    return args


def resolve_defaults(args, config):
    """Resolve what depends on the model: --lr and --lr-decay "auto" (resolve_auto_rates) and the sentence
    flags (sentence_defaults). Returns (the lines that say what was chosen, or None; the model folder's
    interop.SentenceModules, or None). Call it before the run folder records the flags, so that --resume
    compares the resolved values."""
    notes = [note] if (note := resolve_auto_rates(args, config)) else []
    modules = sentence_defaults(args, config, notes)
    if getattr(args, "normalize", None) == "l1":
        notes.append(interop.l1_note("the run folder"))
    if getattr(args, "encoder", None) == "cross" and (note := cross_encoder_note(config, "the run folder")):
        notes.append(note)
    return "\n".join(notes) or None, modules


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


SENTENCE_DEFAULTS = {"pool": "mean", "embed_dim": None, "normalize": "none"}


def sentence_defaults(args, config, notes):
    """The sentence flags a model folder of sentence-transformers gives (interop.read_modules): train.py's
    --pool, and a bi-encoder's --pool, --embed-dim and --normalize. A flag given wins, and a note (added to
    notes) says so; a flag left out takes the folder's value, or else SENTENCE_DEFAULTS'. Returns the
    SentenceModules (whose projection a bi-encoder starts from), or None."""
    if getattr(args, "encoder", None) == "cross":
        return None
    flags = ("pool", "embed_dim", "normalize") if getattr(args, "encoder", None) == "bi" else ("pool",)
    modules = interop.read_modules(args.model, config.hidden_size)
    if modules is None:
        for flag in flags:
            setattr(args, flag, SENTENCE_DEFAULTS[flag] if getattr(args, flag) is None else getattr(args, flag))
        return None
    if args.pool is None and modules.pool == "cls" and modules.pooler is None and config.has_pooler:
        raise UsageError(f"argument --pool: {modules.path} pools the first token's state as it is, but the weights "
                         "hold a pooler, which --pool cls reads (dense + tanh); give --pool cls to train with the "
                         "pooler, or --pool mean or max")
    shown = {"pool": modules.pool, "embed_dim": modules.embed_dim, "normalize": modules.normalize}
    taken = []
    for flag in flags:
        name, given = "--" + flag.replace("_", "-"), getattr(args, flag)
        if given is None:
            setattr(args, flag, shown[flag])
            taken += [f"{name} {shown[flag]}"] if shown[flag] is not None else []
        elif given != shown[flag]:
            notes.append(f"note: {name} {given} given; {modules.path} gives "
                         f"{'no projection' if shown[flag] is None else shown[flag]}: using {given}")
    left = [f"--{flag.replace('_', '-')} {shown[flag]}" for flag in SENTENCE_DEFAULTS
            if flag not in flags and shown[flag] not in (None, "none")]
    notes.append(f"{modules.path}: {modules.describe()}; taken: {', '.join(taken) or 'nothing (flags given)'}"
                 + (f"; not taken by this script: {', '.join(left)} (give them as flags)" if left else ""))
    return modules


def check_flags(args, rates=(), at_least=()):
    """The checks of add_rate_flags' and add_run_flags' values, plus a script's own `rates` (>= 0)
    and `at_least` ((flag, lowest value) pairs, which may also lower a shared flag's); raises
    UsageError naming the flag."""
    if args.resume and args.out is None:
        raise UsageError("argument --resume: give --out, the folder of the run to continue")
    if args.resume:  # a missing, unreadable or other script's checkpoint is said before anything else
        saved = checkpoint.saved_flags(checkpoint.path_in(args.out))
        if ("encoder" in saved) != ("encoder" in vars(args)):  # pairs.py's runs have an --encoder, train.py's not
            raise UsageError(f"argument --resume: {args.out} holds a run of "
                             f"{'pairs.py' if 'encoder' in saved else 'train.py'}; continue it with that script")
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
    if not Path(args.data).is_dir():
        raise UsageError(f"argument --data: {args.data} is not a folder; run `python download.py` first")


def task_values(text):
    """argparse type of --task-lr and --loss-weight: "pos=5e-4,mood=2" -> {"pos": 0.0005, "mood": 2.0}."""
    values = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, comma-separated; got {item!r}") from None
    return values


def check_task_values(flag, values, names):
    """--task-lr and --loss-weight name tasks of the run and give numbers >= 0."""
    for name, value in values.items():
        if name not in names:
            raise UsageError(f"argument --{flag.replace('_', '-')}: {name!r} is not a task of this run "
                             f"({', '.join(names)})")
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"argument --{flag.replace('_', '-')}: {name}'s value must be a number >= 0, got {value}")


def check_sampling(sampling):
    """--sampling: min, proportional, annealed, or temperature:T with T > 0."""
    kind, _, t = sampling.partition(":")
    try:
        ok = (sampling in ("min", "proportional", "annealed") or kind == "annealed" and t.isdigit() and int(t) > 0
              or kind == "temperature" and math.isfinite(float(t)) and float(t) > 0)
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"argument --sampling: expected min, proportional, temperature:T (T > 0) or annealed, "
                         f"got {sampling!r}")


def check_compile(args, config):
    """--compile pads every batch to a multiple of 8 tokens: the widest must fit the model's positions."""
    widest = -(-args.max_len // 8) * 8
    if args.compile and widest > config.max_len:
        raise UsageError(f"argument --compile: --max-len {args.max_len} pads up to {widest} tokens, more than "
                         f"the model's {config.max_len} positions")


def freeze_plan(args, config, heads):
    """--freeze and --unfreeze for this backbone and the model's heads, as a freeze.Plan; UsageError names a
    bad flag. heads: their part names, or train.py's tasks (tasks.Task): a head per task, "<name>_head",
    and "project" under --embed-dim; "cls-head" there names the sentence-level heads (it named AG's when
    that was the only one)."""
    if heads and not isinstance(heads[0], str):
        tasks, heads = heads, [f"{t.name}_head" for t in heads] + (["project"] if args.embed_dim else [])
        sentence = ",".join(f"{t.name}-head" for t in tasks if t.level == "sentence")
        args = argparse.Namespace(**{**vars(args), "freeze": ",".join(
            sentence if item.strip() == "cls-head" and sentence else item for item in args.freeze.split(","))})
    if "none" in [item.strip() for item in args.freeze.split(",")] and args.freeze.strip() != "none":
        raise UsageError(f"argument --freeze: {args.freeze!r}: none freezes nothing, so it stands alone, "
                         "not in a list with other strategies")
    try:
        plan = freeze.Plan.from_flags(args.freeze, args.unfreeze, config.num_hidden_layers, heads, config.has_pooler)
    except ValueError as e:
        raise UsageError(f"argument --freeze: {e}") from None
    if plan.gradual and freeze.backbone_parts(plan.num_layers, plan.pooler) <= plan.base:
        raise UsageError(f"argument --unfreeze: gradual unfreezing releases the backbone layer by layer, but --freeze "
                         f"{args.freeze} keeps all of it frozen; gradual already starts from a frozen backbone, so "
                         "leave 'backbone' out of --freeze")
    return plan


class Renamed(argparse.Action):
    """A flag that was renamed: refuse it with one line that names its successor."""

    def __init__(self, option_strings, dest, hint, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"error: argument {option_string}: renamed; {self.hint}", file=sys.stderr)
        raise SystemExit(2)
