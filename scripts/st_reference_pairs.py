"""Reference figures for pairs.py: sentence-transformers' own bi-/cross-encoder on STS-B.

Fine-tunes a pretrained checkpoint on STS-B train with the library's trainer API and
reports dev Pearson/Spearman (both x100), timings and the effective hyperparameters.

  bi:    SentenceTransformer(model) + losses.CosineSimilarityLoss,
         SentenceTransformerTrainer; score = cosine(emb1, emb2). Also reports zero-shot.
  cross: CrossEncoder(model, num_labels=1) + the trainer's default loss for one label
         (BinaryCrossEntropyLoss), CrossEncoderTrainer; score = model.predict().

Everything not given on the command line (learning rate, warmup, weight decay,
scheduler, optimizer, ...) is left at the library defaults. Labels are score / 5.

Extra requirements (not project dependencies): pip install datasets accelerate in the
environment where you run this, e.g. with `pip install --target DIR/site-packages` and
PYTHONPATH=DIR/site-packages. Keep "site-packages" in that path: datasets hashes its
inputs with dill, which copies (and fails on pyarrow's) modules outside such a folder.

  python scripts/st_reference_pairs.py --encoder bi --model DIR --data DIR \
      --epochs 1 --batch-size 16 --seed 0 [--limit N] [--out FILE.json]

--data holds the original STS benchmark files (sts-train.csv, sts-dev.csv): tab-separated,
unquoted; columns genre, file, year, id, score, sentence1, sentence2 [, extra ...].
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr


def read_sts(path: str, limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """Read an STS benchmark file; returns sentences1, sentences2, labels in [0, 1]."""
    s1, s2, labels = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\r\n").split("\t")
            if len(cols) < 7:
                continue
            s1.append(cols[5])
            s2.append(cols[6])
            labels.append(float(cols[4]) / 5.0)
            if limit is not None and len(labels) >= limit:
                break
    return s1, s2, labels


def correlations(gold, pred) -> dict:
    return {
        "spearman_x100": 100.0 * float(spearmanr(gold, pred)[0]),
        "pearson_x100": 100.0 * float(pearsonr(gold, pred)[0]),
    }


def training_args_kwargs(args, output_dir: str) -> dict:
    """Only what we set; everything else stays at the library default."""
    return dict(
        output_dir=output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        seed=args.seed,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def effective_hparams(trainer) -> dict:
    """What the trainer actually used (read back from args, optimizer and scheduler)."""
    a = trainer.args
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # unwrap accelerate's AcceleratedOptimizer
    sched = trainer.lr_scheduler
    sched = getattr(sched, "scheduler", sched)
    total_steps = trainer.state.max_steps
    groups = [
        {k: v for k, v in g.items() if k in ("lr", "initial_lr", "weight_decay", "betas", "eps", "fused", "foreach")}
        | {"n_params": sum(p.numel() for p in g["params"]), "n_tensors": len(g["params"])}
        for g in opt.param_groups
    ]
    return {
        "learning_rate": a.learning_rate,
        "warmup_steps_arg": a.warmup_steps,
        "warmup_ratio_arg": getattr(a, "warmup_ratio", None),
        "warmup_steps_effective": a.get_warmup_steps(total_steps),
        "total_steps": total_steps,
        "weight_decay": a.weight_decay,
        "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
        "lr_scheduler_class": type(sched).__name__,
        "optim": str(getattr(a.optim, "value", a.optim)),
        "optimizer_class": f"{type(opt).__module__}.{type(opt).__name__}",
        "adam_beta1": a.adam_beta1,
        "adam_beta2": a.adam_beta2,
        "adam_epsilon": a.adam_epsilon,
        "max_grad_norm": a.max_grad_norm,
        "batch_sampler": str(getattr(a.batch_sampler, "value", a.batch_sampler)),
        "dataloader_drop_last": a.dataloader_drop_last,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "fp16": a.fp16,
        "bf16": a.bf16,
        "param_groups": groups,
        "final_train_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
    }


def run_bi(args, train, dev) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    model = SentenceTransformer(args.model, device="cpu")
    s1, s2, gold = dev

    def evaluate() -> tuple[dict, float]:
        t0 = time.perf_counter()
        e1 = model.encode(s1, convert_to_tensor=True)
        e2 = model.encode(s2, convert_to_tensor=True)
        cos = torch.nn.functional.cosine_similarity(e1, e2).cpu().numpy()
        secs = time.perf_counter() - t0
        return correlations(gold, cos), secs

    zero_shot, zero_secs = evaluate()
    print(f"zero-shot dev: {zero_shot}", flush=True)

    train_ds = Dataset.from_dict({"sentence1": train[0], "sentence2": train[1], "score": train[2]})
    loss = losses.CosineSimilarityLoss(model)
    with tempfile.TemporaryDirectory() as tmp:
        targs = SentenceTransformerTrainingArguments(**training_args_kwargs(args, tmp))
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=train_ds, loss=loss)
        t0 = time.perf_counter()
        trainer.train()
        train_secs = time.perf_counter() - t0

    dev_metrics, eval_secs = evaluate()
    evaluator = EmbeddingSimilarityEvaluator(s1, s2, gold, similarity_fn_names=["cosine"], name="sts-dev",
                                             write_csv=False)
    lib = evaluator(model)

    tr = model[0]
    return {
        "zero_shot_dev": zero_shot,
        "zero_shot_eval_seconds": zero_secs,
        "dev": dev_metrics,
        "dev_library_evaluator_x100": {k: 100.0 * float(v) for k, v in lib.items()},
        "train_seconds": train_secs,
        "eval_seconds": eval_secs,
        "hparams": effective_hparams(trainer),
        "loss": {"class": type(loss).__name__, "loss_fct": type(loss.loss_fct).__name__,
                 "cos_score_transformation": type(loss.cos_score_transformation).__name__},
        "architecture": {
            "pipeline": [f"{type(m).__module__}.{type(m).__name__}" for m in model],
            "transformer_class": type(tr.auto_model).__name__,
            "pooling": model[1].get_config_dict() if len(model) > 1 else None,
            "has_normalize": any(type(m).__name__ == "Normalize" for m in model),
            "max_seq_length": model.max_seq_length,
            "tokenizer_model_max_length": model.tokenizer.model_max_length,
        },
    }


def run_cross(args, train, dev) -> dict:
    from datasets import Dataset
    from safetensors import safe_open
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderCorrelationEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    model = CrossEncoder(args.model, num_labels=1, device="cpu")
    hf = model.model  # the underlying transformers model

    # Does the head reuse the checkpoint's pooler weights? (classifier is freshly initialised)
    ckpt = os.path.join(args.model, "model.safetensors")
    pooler_from_ckpt = None
    if os.path.exists(ckpt) and hasattr(hf, "bert") and hf.bert.pooler is not None:
        with safe_open(ckpt, "pt") as f:
            keys = set(f.keys())
            k = "pooler.dense.weight" if "pooler.dense.weight" in keys else "bert.pooler.dense.weight"
            if k in keys:
                pooler_from_ckpt = bool(torch.equal(f.get_tensor(k), hf.bert.pooler.dense.weight.detach().cpu()))
    head = {
        "transformers_class": type(hf).__name__,
        "pooler": repr(getattr(getattr(hf, "bert", None), "pooler", None)),
        "pooler_weights_from_checkpoint": pooler_from_ckpt,
        "dropout": repr(getattr(hf, "dropout", None)),
        "classifier": repr(getattr(hf, "classifier", None)),
        "classifier_dropout_config": getattr(hf.config, "classifier_dropout", None),
        "hidden_dropout_prob": getattr(hf.config, "hidden_dropout_prob", None),
        "sentence_transformers_modules": [f"{type(m).__module__}.{type(m).__name__}" for m in model],
        "predict_activation_fn": repr(model.activation_fn),
        "max_seq_length": model.max_seq_length,
        "tokenizer_model_max_length": model.tokenizer.model_max_length,
    }

    train_ds = Dataset.from_dict({"sentence1": train[0], "sentence2": train[1], "score": train[2]})
    with tempfile.TemporaryDirectory() as tmp:
        targs = CrossEncoderTrainingArguments(**training_args_kwargs(args, tmp))
        trainer = CrossEncoderTrainer(model=model, args=targs, train_dataset=train_ds)  # default loss
        loss = trainer.loss
        assert isinstance(loss, BinaryCrossEntropyLoss), type(loss)
        t0 = time.perf_counter()
        trainer.train()
        train_secs = time.perf_counter() - t0

    s1, s2, gold = dev
    pairs = list(zip(s1, s2))
    t0 = time.perf_counter()
    pred = model.predict(pairs)  # default activation (Sigmoid for num_labels=1)
    eval_secs = time.perf_counter() - t0
    lib = CrossEncoderCorrelationEvaluator(pairs, gold, name="sts-dev", write_csv=False)(model)

    return {
        "dev": correlations(gold, pred),
        "dev_library_evaluator_x100": {k: 100.0 * float(v) for k, v in lib.items()},
        "train_seconds": train_secs,
        "eval_seconds": eval_secs,
        "hparams": effective_hparams(trainer),
        "loss": {"class": f"{type(loss).__module__}.{type(loss).__name__}", **loss.get_config_dict(),
                 "inner": repr(loss.bce_with_logits_loss)},
        "architecture": head,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", choices=["bi", "cross"], required=True)
    p.add_argument("--model", required=True, help="local pretrained model directory")
    p.add_argument("--data", required=True, help="directory with sts-train.csv and sts-dev.csv")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N train and N dev pairs (smoke test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    from transformers import set_seed

    train = read_sts(os.path.join(args.data, "sts-train.csv"), args.limit)
    dev = read_sts(os.path.join(args.data, "sts-dev.csv"), args.limit)
    set_seed(args.seed)  # before model creation: the cross-encoder's classifier is randomly initialised

    run = run_bi if args.encoder == "bi" else run_cross
    res = run(args, train, dev)

    import sentence_transformers
    import transformers

    result = {
        "encoder": args.encoder,
        "model": os.path.abspath(args.model),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "train_pairs": len(train[2]),
        "dev_pairs": len(dev[2]),
        "correlations_scale": "x100",
        **res,
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "torch_num_threads": torch.get_num_threads(),
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
