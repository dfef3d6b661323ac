"""Time the training step (forward + backward + AdamW) of the multi-task model.

    python bench.py --config minilm --batch-size 32 --seq-len 64
    python bench.py --config bert-base --precision fp32 bf16 --freeze none backbone --vs-transformers
    python bench.py --model DIR --json results.json
    python bench.py --config bert-base --precision bf16 --vs-transformers --compile ours --profile 5

Each setting runs a few warm-up steps, then times several steps and reports
the median: ms per step, samples/s, tokens/s and peak memory (on the CPU,
the process's largest resident size so far, so it only grows from row to
row), and the step's TFLOP/s (6 per weight of the encoder's layers per token,
2 with a frozen backbone; attention's own products are not counted) as a
share of the device's fp32 and bf16 matrix-product peaks, measured at start. --vs-transformers also times transformers' model of the same family
(BertModel, RobertaModel, DistilBertModel) with the same heads, shapes and precision in the same process, and prints the ratio (ours /
theirs, below 1 is faster). The two models take turns step by step, so a
drift of the machine's speed affects both alike. --compile compiles both
models; --compile ours leaves transformers' eager, the usual way to run it.
--profile N then runs N more steps of our model under torch.profiler and
prints the kernels that took the most device time. Output: a markdown table,
and JSON with --json. Every number flag is checked before anything runs
(AT_LEAST): a bad one is one line naming it, and exit status 2.

    python bench.py --model DIR --lengths data/conll2003/train.txt --vs-transformers

--lengths times batches of real examples instead, drawn as train.py draws
them: random batches padded to their longest, run padded and unpadded
(model.Packing), and batches grouped by length (--group-window 50), against
transformers' model on the same random batches. Its table counts real
tokens per second: padding is work done, not work wanted.
"""

from support import cpu_threads  # noqa: F401  first: before torch starts, how its CPU threads wait

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from data import MultiTaskSampler, collate, encode_file, load_tokenizer
from support.tasks import SEED_TASKS, TASKS
from model import UNPAD, Bert, BertConfig, Head, MultiTaskModel, SentenceEncoder
from support.model_folder import config_json, load_pretrained
from support.runtime import CheckpointError, DataError, HelpFormatter, Place, UsageError, exit_status_of, pick_device

SHAPES = {  # each backbone's shape, as its config.json on the hub gives it (the hub files have no pooler
    # for RoBERTa and DistilBERT, so neither has one here)
    "bert-base": BertConfig(),
    "roberta-base": BertConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                               pad_token_id=1, model_type="roberta", has_pooler=False),
    "distilbert-base": BertConfig(num_hidden_layers=6, type_vocab_size=0, model_type="distilbert",
                                  has_pooler=False),
    "minilm": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
DTYPES = {"fp32": None, "tf32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
AT_LEAST = {"batch_size": 1, "seq_len": 1, "warmup": 0, "steps": 1, "profile": 0}  # each number flag's lowest value


class TransformersModel(torch.nn.Module):
    """transformers' model of the same family (BertModel, RobertaModel, DistilBertModel) with our two
    heads, mean pooling: the same job, the framework's encoder."""

    def __init__(self, config, bert=None):
        """A randomly initialized model of config's family and shape, or the given (e.g. pretrained) one."""
        super().__init__()
        import transformers
        if bert is None:
            hf_config = transformers.AutoConfig.for_model(**config_json(config))
            pooler = {} if config.model_type == "distilbert" else {"add_pooling_layer": config.has_pooler}
            bert = transformers.AutoModel.from_config(hf_config, **pooler)
        self.bert = bert
        self.heads = torch.nn.ModuleDict({name: Head(config.hidden_size, len(TASKS[name].labels))
                                          for name in SEED_TASKS})

    def forward(self, input_ids, attention_mask, task):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if TASKS[task].level == "sentence":
            keep = attention_mask[:, :, None].to(hidden.dtype)
            return self.heads[task]((hidden * keep).sum(1) / keep.sum(1).clamp(min=1))
        return self.heads[task](hidden)


def make_batch(config, batch_size, seq_len, device):
    """Random ids; a quarter of the rows padded to half length, as real batches are. The same batch serves
    both tasks, one step each: [(task, input_ids, attention_mask, labels)]."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(min(1000, config.vocab_size // 2), config.vocab_size, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(input_ids)
    mask[: batch_size // 4, seq_len // 2:] = 0
    tags = torch.randint(0, 9, (batch_size, seq_len), generator=g).masked_fill(mask == 0, -100)
    classes = torch.randint(0, 4, (batch_size,), generator=g)
    input_ids, mask, tags, classes = (t.to(device) for t in (input_ids.masked_fill(mask == 0, config.pad_token_id),
                                                              mask, tags, classes))
    sentence, word = SEED_TASKS  # a label per text, a tag per word
    return [(sentence, input_ids, mask, classes), (word, input_ids, mask, tags)]


def real_batches(args, config, device):
    """--lengths: {"random": batches, "grouped": batches} of real examples, as make_batch gives them,
    warmup + steps of each: the first batches of a train.py epoch (in shuffled order, so an unbiased
    draw) with --group-window 0 and 50."""
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    task = SEED_TASKS[1] if args.lengths.endswith(".txt") else SEED_TASKS[0]  # a CoNLL file, or an AG News CSV
    part = encode_file(args.lengths, TASKS[task], tokenizer, args.seq_len)
    out = {}
    for name, window in (("random", 0), ("grouped", 50)):
        batches = MultiTaskSampler({task: part.lengths()}, args.batch_size, 0, window).epoch(0)
        chosen = [batches[i % len(batches)][1] for i in range(args.warmup + args.steps)]
        out[name] = [(task, *(collate(part, indices, config.pad_token_id)[k].to(device)
                              for k in ("input_ids", "attention_mask", "labels"))) for indices in chosen]
    return out


def make_step(model, batches, device, dtype, freeze):
    """A closure that runs one training step of `model` on the next of `batches` (in turn, round and
    round) and returns the batch's real tokens."""
    if freeze == "backbone":
        for p in model.bert.parameters():
            p.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    real_tokens = [int(mask.sum()) for _, _, mask, _ in batches]  # counted once, before the clock runs
    count = [0]

    def step():
        task, input_ids, mask, labels = batches[count[0] % len(batches)]
        count[0] += 1
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids, mask, task)
        if TASKS[task].level == "sentence":
            loss = F.cross_entropy(logits.float(), labels)
        else:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return real_tokens[(count[0] - 1) % len(batches)]

    return step


def time_steps(steps_by_name, device, warmup, n):
    """{name: (median seconds per step, total seconds, real tokens)} of each model's n timed steps. The
    models take turns, step by step and in alternating order, so that drifts of the machine (clock
    speed, other work) affect them alike."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times, tokens = {name: [] for name in steps_by_name}, dict.fromkeys(steps_by_name, 0)
    order = list(steps_by_name.items())
    for round_ in range(n):
        for name, step in order if round_ % 2 == 0 else order[::-1]:  # who goes first alternates too
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            tokens[name] += step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), sum(t), tokens[name]) for name, t in times.items()}


def matmul_tflops(device, dtype, seconds=0.5):
    """Measured matrix-product throughput in TFLOP/s, the ceiling a step's FLOP/s is measured
    against: n x n by n x n, n = 8192 on a GPU and 1024 on the CPU, repeated for about `seconds`
    (constant inputs: the value does not change the time, and no random numbers are drawn)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    done, start = 0, time.perf_counter()
    while done < 3 or time.perf_counter() - start < seconds:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * done / (time.perf_counter() - start) / 1e12


def matmul_peaks(device):
    """{"fp32": TFLOP/s, "bf16": TFLOP/s} of this device's matrix products (TF32 off for fp32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    return {"fp32": matmul_tflops(device, torch.float32), "bf16": matmul_tflops(device, torch.bfloat16)}


def train_flops(config, batch_size, seq_len, frozen):
    """Approximate FLOPs of one step: 6 per parameter-token (2 forward + 4 backward), 2 if the encoder is frozen."""
    layer = 4 * config.hidden_size**2 + 2 * config.hidden_size * config.intermediate_size
    per_token = config.num_hidden_layers * layer
    return (2 if frozen else 6) * per_token * batch_size * seq_len


def parser():
    """The flags, each with its help: `python bench.py --help`."""
    p = argparse.ArgumentParser(description="Time the training step of the multi-task model.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="a BERT folder (weights are loaded; only the shape matters for speed)")
    p.add_argument("--config", choices=tuple(SHAPES), default="minilm", help="a named shape, if no --model")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--seq-len", type=int, default=None,
                   help="word pieces per example (a quarter of the rows are padding from halfway; default 64); "
                        "with --lengths the most an example keeps (default 128, train.py's --max-len); at most "
                        "the model's positions")
    p.add_argument("--lengths", metavar="FILE",
                   help="time batches of real examples from FILE (a CoNLL-2003 .txt or an AG News .csv) instead: "
                        "padded random, grouped by length and unpadded random batches")
    p.add_argument("--tokenizer", metavar="DIR", help="with --lengths and --config: a model folder whose tokenizer "
                                                      "cuts FILE into word pieces (default: --model)")
    p.add_argument("--unpad", choices=UNPAD, default="auto",
                   help="our model's unpadded path (model.Packing) for batches with padding; auto: on the CPU")
    p.add_argument("--precision", nargs="+", choices=tuple(DTYPES), default=["fp32"],
                   help="one table row each: fp32; tf32 (fp32 with TF32 matrix products); fp16 (autocast and a "
                        "GradScaler); bf16 (autocast). tf32 and fp16 need a CUDA GPU")
    p.add_argument("--freeze", nargs="+", choices=("none", "backbone"), default=["none"],
                   help="one table row each: none trains everything, backbone trains only the two heads")
    p.add_argument("--compile", nargs="?", const="both", choices=("both", "ours"),
                   help="torch.compile both models, or only ours (transformers' then runs eager)")
    p.add_argument("--vs-transformers", action="store_true",
                   help="also time transformers' model of the same family, taking turns step by step, and print "
                        "the ratio ours / theirs")
    p.add_argument("--warmup", type=int, default=3, help="steps each model runs before the timed ones")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model; the table gives their median")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda where there is one")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N steps of our model and print its top kernels")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def check_numbers(args):
    """Every number flag at least its lowest value (AT_LEAST); UsageError names the first that is not. Past
    them, --steps 0 leaves no time to take a median of and --seq-len 0 no token, and --batch-size 0
    would time empty steps."""
    for flag, low in AT_LEAST.items():
        value = getattr(args, flag)
        if value is not None and value < low:  # None: the default that follows other flags
            raise UsageError(f"argument --{flag.replace('_', '-')}: must be at least {low}, got {value}")


def pick_device_for(args):
    """The device, once the flags are known to work on it; UsageError names the flag otherwise."""
    device = pick_device(args.device)
    if args.vs_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError("argument --vs-transformers: the transformers package is not installed") from None
    bad = [x for x in args.precision if x in ("fp16", "tf32") and device.type != "cuda"]
    if bad:
        raise UsageError(f"argument --precision: {', '.join(bad)} needs a CUDA GPU")
    return device


def build_model(args, config, device, name):
    """One model on the device: "ours" (unpadded as --unpad says), "ours padded" or "transformers", each from
    the same seed, compiled as --compile says."""
    torch.manual_seed(0)
    if name == "transformers":
        model = TransformersModel(config)
    else:
        model = MultiTaskModel(SentenceEncoder(load_pretrained(args.model) if args.model else Bert(config)))
        model.bert.unpad = "never" if name == "ours padded" else args.unpad
    model = model.to(device)
    if args.compile == "both" or (args.compile and name != "transformers"):
        model = torch.compile(model)
    return model


def measure(args, config, device, precision, freeze, peak_tflops):
    """One table row: our model's step, and transformers' with --vs-transformers, taking turns."""
    names = ["ours"] + (["transformers"] if args.vs_transformers else [])
    result = {"precision": precision, "freeze": freeze, "batch": args.batch_size, "seq": args.seq_len}
    batch = make_batch(config, args.batch_size, args.seq_len, device)
    steps, peaks = {}, {}
    for name in names:  # each built when its turn comes, so that its peak memory is measured as before
        model = build_model(args, config, device, name)
        if name == "ours":
            result["parameters"] = sum(p.numel() for p in model.bert.parameters())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps[name] = make_step(model, batch, device, DTYPES[precision], freeze)
        for _ in range(args.warmup):
            steps[name]()
        peaks[name] = Place(device).peak_memory_mb()  # after warm-up: weights, optimizer state, activations
    timed = time_steps(steps, device, 0, args.steps)
    for name in steps:
        seconds = timed[name][0]
        result[name] = {"ms": seconds * 1e3, "samples_per_s": args.batch_size / seconds,
                        "tokens_per_s": args.batch_size * args.seq_len / seconds, "peak_mb": peaks[name]}
        # The step's FLOP/s, and its share of each precision's matrix-product peak.
        tflops = train_flops(config, args.batch_size, args.seq_len, freeze == "backbone") / seconds / 1e12
        result[name] |= {"tflops": tflops, "of_fp32_peak": tflops / peak_tflops["fp32"],
                         "mfu": tflops / peak_tflops["bf16"]}
    if args.vs_transformers:
        result["ratio"] = result["ours"]["ms"] / result["transformers"]["ms"]
    if args.profile:
        profile(steps["ours"], device, args.profile, f"{precision}, freeze {freeze}")
    return result


# --lengths: each setting is (the model, the batches it runs)
REAL_SETTINGS = {"padded random": ("ours padded", "random"), "grouped": ("ours padded", "grouped"),
                 "unpadded random": ("ours", "random"), "transformers, padded random": ("transformers", "random")}


def measure_real(args, config, device, precision, freeze, batches):
    """--lengths: one table row per setting (REAL_SETTINGS), all taking turns step by step."""
    settings = [s for s in REAL_SETTINGS if args.vs_transformers or REAL_SETTINGS[s][0] != "transformers"]
    names = dict.fromkeys(REAL_SETTINGS[s][0] for s in settings)  # each model once, in the settings' order
    models = {name: build_model(args, config, device, name) for name in names}
    steps = {s: make_step(models[REAL_SETTINGS[s][0]], batches[REAL_SETTINGS[s][1]], device, DTYPES[precision],
                          freeze) for s in settings}
    timed = time_steps(steps, device, args.warmup, args.steps)
    rows = []
    for setting in settings:
        _, seconds, tokens = timed[setting]
        timed_batches = batches[REAL_SETTINGS[setting][1]][args.warmup:]
        positions = sum(ids.numel() for _, ids, _, _ in timed_batches)
        rows.append({"precision": precision, "freeze": freeze, "setting": setting, "batch": args.batch_size,
                     "tokens_per_s": tokens / seconds, "ms": seconds / args.steps * 1e3,
                     "padding": 1 - tokens / positions})
    base = rows[0]["tokens_per_s"]  # padded random
    for row in rows:
        row["vs_padded_random"] = row["tokens_per_s"] / base
    if args.profile:
        profile(steps["unpadded random"], device, args.profile, f"unpadded random, {precision}, freeze {freeze}")
    return rows


def profile(step, device, n, label, top=15):
    """Print the kernels (or CPU operators) of n steps that took the most time, and their share."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0 and not e.is_user_annotation]
    if device.type == "cuda":  # kernels and copies only: the operators and annotations (such as
        # "Optimizer.step#AdamW.step") that launch them would count the same time again
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, attr) for e in events)
    print(f"profile of our model, {label}, {n} steps: {total / 1e3 / n:.2f} ms of "
          f"{'device' if device.type == 'cuda' else 'CPU'} time per step, top {top}:")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
        print(f"  {getattr(e, attr) / total:6.1%} {getattr(e, attr) / 1e3 / n:8.3f} ms/step  {e.count // n:5d}x  "
              f"{e.key[:110]}")


def print_table(args, rows, device, peaks):
    print(f"{args.model or args.config} ({rows[0]['parameters'] / 1e6:.1f} M parameters), {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {args.steps} steps, "
          f"matrix products {peaks['fp32']:.3g} TFLOP/s fp32, {peaks['bf16']:.3g} bf16"
          + {None: "", "ours": ", our model compiled", "both": ", both models compiled"}[args.compile])
    head = "| precision | freeze | B | S | ms/step | samples/s | tokens/s | peak MB |"
    head += " TFLOP/s | of fp32 peak | of bf16 peak |"
    head += " transformers ms/step | ours / transformers |" if args.vs_transformers else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        o = r["ours"]
        line = (f"| {r['precision']} | {r['freeze']} | {r['batch']} | {r['seq']} | {o['ms']:.1f} | "
                f"{o['samples_per_s']:,.1f} | {o['tokens_per_s']:,.0f} | {o['peak_mb']:,.0f} |")
        line += f" {o['tflops']:.3g} | {o['of_fp32_peak']:.1%} | {o['mfu']:.1%} |"
        if args.vs_transformers:
            line += f" {r['transformers']['ms']:.1f} | {r['ratio']:.3f} |"
        print(line)


def print_real_table(args, rows, device):
    print(f"{args.model or args.config}, {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; batches of {args.batch_size} from {args.lengths} (at most "
          f"{args.seq_len} word pieces), {args.steps} timed steps each")
    print("| precision | freeze | batches | real tokens/s | padding | ms/step, mean | vs padded random |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['freeze']} | {r['setting']} | {r['tokens_per_s']:,.0f} | {r['padding']:.1%} | "
              f"{r['ms']:.1f} | {r['vs_padded_random']:.2f}x |")


def main(argv=None):
    args = parse_args(argv)
    try:
        check_numbers(args)
        device = pick_device_for(args)
        config = load_pretrained(args.model).config if args.model else SHAPES[args.config]
        args.seq_len = args.seq_len or (min(128, config.max_len) if args.lengths else 64)
        if args.seq_len > config.max_len:
            raise UsageError(f"argument --seq-len: {args.seq_len} is more than the model's {config.max_len} positions")
        if args.lengths and not (args.model or args.tokenizer):
            raise UsageError("argument --lengths: needs a tokenizer: give --model, or --tokenizer with --config")
        batches = real_batches(args, config, device) if args.lengths else None
    except (UsageError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak_tflops = None if args.lengths else matmul_peaks(device)
    rows = []
    for precision in args.precision:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        for freeze in args.freeze:
            if batches:
                rows += measure_real(args, config, device, precision, freeze, batches)
            else:
                rows.append(measure(args, config, device, precision, freeze, peak_tflops))
    if batches:
        print_real_table(args, rows, device)
    else:
        print_table(args, rows, device, peak_tflops)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.model or args.config, "device": str(device), "torch": torch.__version__,
                       "compile": args.compile, "peak_tflops": peak_tflops, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status_of(main))
