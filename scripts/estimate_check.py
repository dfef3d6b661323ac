"""What train.py's start-of-run estimate gives for a job, next to a time you measured for it.

    python scripts/estimate_check.py MODEL_DIR DATA_DIR [--epochs 2] [--batch-size 32]

For the default job (everything trains) and for --freeze backbone, on the
tasks ag and ner of DATA_DIR: the encoder's FLOP as support/step_log.py
counts them, the CPU's measured fp32 matrix-product rate, and the time at
that rate and at STEP_SHARE of it (what the warning uses). The measured
times behind STEP_SHARE are in docs/performance.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import cpu_threads  # noqa: F401,E402  first: before torch starts

import argparse  # noqa: E402

from data import MultiTaskSampler, load_splits, load_tokenizer  # noqa: E402
from model import MultiTaskModel, SentenceEncoder  # noqa: E402
from support import step_log  # noqa: E402
from support.model_folder import load_pretrained  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    args = p.parse_args()
    tokenizer = load_tokenizer(args.model)
    splits = load_splits(args.data, tokenizer, args.max_len)
    sampler = MultiTaskSampler({task: by["train"].lengths() for task, by in splits.items()}, args.batch_size)
    model = MultiTaskModel(SentenceEncoder(load_pretrained(args.model)))
    rate = step_log.matmul_rate(model.bert.config.hidden_size, seconds=1.0)
    print(f"fp32 matrix product, {model.bert.config.hidden_size} wide: {rate / 1e9:.1f} GFLOP/s")
    for name, frozen in (("default job", False), ("--freeze backbone", True)):
        flops = step_log.estimated_flops(model, sampler, splits, range(args.epochs), frozen)
        print(f"{name}, {args.epochs} epochs: {flops / 1e12:.1f} TFLOP; {flops / rate:.0f} s at the product's "
              f"rate, {flops / (step_log.STEP_SHARE * rate):.0f} s at STEP_SHARE {step_log.STEP_SHARE}")


if __name__ == "__main__":
    main()
