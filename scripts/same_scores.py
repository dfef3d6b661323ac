"""Record, or check, what a set of training runs produces, so that a change meant to keep behaviour can prove it.

    python scripts/same_scores.py --model DIR --data DIR --write before.json   # on the code as it was
    python scripts/same_scores.py --model DIR --data DIR --check before.json   # on the changed code

Each run goes through the command line, so the script works on any version
of the code that takes these flags. What is compared, run by run: every
record of metrics.jsonl and summary.json without the fields that measure
time, memory or paths, and the loss columns of every step line (by their
numbers: a renamed part is no difference; a flag one version lacks is
listed as a note, and a flag both have must hold the same value). The runs:
the default job, --pool max --freeze backbone (the feature store),
--unfreeze gradual, two ranks under torchrun, a run stopped by --stop-after
and resumed (which must also equal the straight run), and pairs.py's
bi-encoder and cross-encoder. --check exits 1 on any difference, naming it.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARYING = {"elapsed_s", "samples_per_s", "timings_s", "peak_memory_mb", "seconds", "cache", "sentences_per_s",
           "pairs_per_s", "out", "data", "model", "device"}  # time, memory, and this machine's paths


def runs(model, data, limit):
    common = ["--model", model, "--data", data, "--max-len", "64", "--log-every", "1", "--no-data-cache"]
    common += ["--limit", str(limit)] if limit else []
    train = [sys.executable, str(ROOT / "train.py"), *common, "--batch-size", "4", "--epochs", "2"]
    pairs = [sys.executable, str(ROOT / "pairs.py"), *[c for c in common if c != "--no-data-cache"],
             "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--head-lr", "1e-3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train[1:]]
    return {
        "default": [train],
        "max-backbone": [train + ["--pool", "max", "--freeze", "backbone"]],
        "gradual": [train + ["--unfreeze", "gradual"]],
        "torchrun-2": [torchrun + ["--batch-size", "2"]],
        "stopped-resumed": [train + ["--stop-after", "1"], train + ["--resume"]],
        "pairs-bi": [pairs + ["--encoder", "bi"]],
        "pairs-cross": [pairs + ["--encoder", "cross"]],
    }


def without(value):
    """value without the fields in VARYING, at any depth."""
    if isinstance(value, dict):
        return {k: without(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [without(v) for v in value]
    return value


def outcome(commands, out):
    """What the commands leave in out and print: metrics.jsonl, summary.json, the step lines' losses."""
    steps = []
    for command in commands:
        env = dict(os.environ, OMP_NUM_THREADS="1")  # the two ranks share the cores; one run's numbers stay put
        result = subprocess.run(command + ["--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)}: exit status {result.returncode}\n{result.stderr[-2000:]}")
        steps += [line.split(" | samples/s")[0].split(" | ")[:4] for line in result.stdout.splitlines()
                  if re.match(r"step \d+/", line)]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return without({"metrics": metrics, "summary": summary, "steps": steps})


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def numbers_only(record):
    """A record as --check compares it: a step line's fields by their numbers (the loss of each task, the
    rate of each group), so that a part renamed (cls_head -> ag_head) is no difference."""
    return {**record, "steps": [[NUMBER.findall(field) for field in line] for line in record["steps"]]}


def flag_notes(before, after):
    """Flags that one version records and the other does not (a flag added or renamed): listed, not counted;
    a flag both record must hold the same value (differences() compares it)."""
    notes = []
    for name in sorted(before.keys() & after.keys()):
        old, new = before[name]["summary"].get("config", {}), after[name]["summary"].get("config", {})
        notes += [f"{name}: flag --{k} only in the record ({old[k]!r})" for k in sorted(old.keys() - new.keys())]
        notes += [f"{name}: flag --{k} is new ({new[k]!r})" for k in sorted(new.keys() - old.keys())]
        for k in old.keys() ^ new.keys():
            old.pop(k, None), new.pop(k, None)
    return notes


def differences(a, b, where=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=None, help="passed to every run (for larger data)")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", help="record the outcomes in this JSON file")
    action.add_argument("--check", help="compare the outcomes with this JSON file")
    args = p.parse_args()
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, commands in runs(args.model, args.data, args.limit).items():
            got[name] = outcome(commands, Path(tmp) / name)
            print(f"{name}: {len(got[name]['steps'])} step lines, {len(got[name]['metrics'])} evaluations", flush=True)
    problems = differences(got["default"]["metrics"], got["stopped-resumed"]["metrics"], "stopped-resumed vs default")
    if args.write:
        Path(args.write).write_text(json.dumps(got, indent=1) + "\n")
        print(f"wrote {args.write}")
    else:
        before = json.loads(Path(args.check).read_text())
        for line in flag_notes(before, got):
            print(f"note: {line}")
        problems += differences({k: numbers_only(v) for k, v in before.items()},
                                {k: numbers_only(v) for k, v in got.items()})
    for line in problems:
        print(line)
    print(f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
