"""The multi-task job of train.py, built the usual way from transformers: the baseline for end-to-end speed.

Run by hand (it is not a test), then time train.py on the same data and compare:

    time python scripts/speed_vs_transformers.py --model MODEL --data DATA --epochs 2 --out runs/hf
    time python train.py --model MODEL --data DATA --epochs 2 --out runs/ours

What is the same as train.py's defaults: the data and its splits (data.py's
readers and the fixed AG validation split), mean pooling, the two heads
(model.Head), the loss, AdamW with the layer-wise learning rates of lr.py,
warmup and linear decay, gradient clipping, the epoch (min(task sizes)
examples from each task, single-task batches of 32 in random order), and the
metrics (metrics.py). What is the usual transformers way instead:
`BertModel.from_pretrained` and its tokenizer, and batches padded to their
longest example (DataCollatorWithPadding / DataCollatorForTokenClassification)
with no grouping by length. It prints validation scores per epoch, test scores
at the end, and writes OUT/summary.json with the timings.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import AG_VALID_FRACTION, NER_ID, NER_TAGS, read_ag_news, read_conll, split_off  # noqa: E402
from lr import lr_factor, part_rates  # noqa: E402
from metrics import accuracy, entity_counts, scores_from_counts  # noqa: E402
from bench import TransformersModel  # noqa: E402
from model import BertConfig  # noqa: E402


def part_of(name):
    """transformers' parameter names -> the parts of lr.part_rates."""
    if name.startswith(("cls_head", "ner_head")):
        return name.split(".")[0]
    if name.startswith("bert.encoder.layer."):
        return "layer." + name.split(".")[3]
    return "pooler" if name.startswith("bert.pooler") else "embeddings"


def param_groups(model, rates, weight_decay):
    groups = {}
    for name, param in model.named_parameters():
        part = part_of(name)
        decays = not (name.endswith(".bias") or "LayerNorm" in name or ".norm." in name)
        group = groups.setdefault((part, decays), {"params": [], "base_lr": rates[part],
                                                   "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
    return list(groups.values())


def tokenize_ag(tokenizer, rows, max_len):
    return [dict(tokenizer(text, truncation=True, max_length=max_len), labels=label) for text, label in rows]


def tokenize_ner(tokenizer, sentences, max_len):
    """Label the first piece of each word, -100 elsewhere: the usual token-classification recipe."""
    examples = []
    for words, tags in sentences:
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
        labels, previous = [], None
        for word in encoded.word_ids():
            labels.append(NER_ID[tags[word]] if word is not None and word != previous else -100)
            previous = word
        examples.append(dict(encoded, labels=labels, words=len(words)))
    return examples


def epoch_batches(sizes, batch_size, rng):
    """min(task sizes) random examples per task, cut into single-task batches, in random order."""
    n = min(sizes.values())
    batches = []
    for task, size in sizes.items():
        chosen = rng.permutation(size)[:n]
        batches += [(task, chosen[i:i + batch_size]) for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def to_batch(collators, examples, task, indices, device):
    rows = [{k: v for k, v in examples[task][i].items() if k != "words"} for i in indices]
    return {k: v.to(device) for k, v in collators[task](rows).items()}


@torch.no_grad()
def evaluate(model, collators, examples, gold_sentences, device, batch_size):
    model.eval()
    predicted, gold = [], []
    for start in range(0, len(examples["ag"]), batch_size):
        batch = to_batch(collators, examples, "ag", range(start, min(start + batch_size, len(examples["ag"]))), device)
        predicted += model(batch["input_ids"], batch["attention_mask"], "ag").argmax(-1).tolist()
        gold += batch["labels"].tolist()
    tags = []
    for start in range(0, len(examples["ner"]), batch_size):
        indices = range(start, min(start + batch_size, len(examples["ner"])))
        batch = to_batch(collators, examples, "ner", indices, device)
        pieces = model(batch["input_ids"], batch["attention_mask"], "ner").argmax(-1).tolist()
        for row, i in enumerate(indices):
            firsts = [p for p, label in zip(pieces[row], batch["labels"][row].tolist()) if label != -100]
            words = examples["ner"][i]["words"]
            tags.append([NER_TAGS[p] for p in firsts] + ["O"] * (words - len(firsts)))  # truncated words: O
    scores = scores_from_counts(entity_counts([t for _, t in gold_sentences], tags))
    model.train()
    return {"ag_accuracy": accuracy(gold, predicted), "ner_f1": scores["f1"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)

    tokenizer = transformers.BertTokenizerFast.from_pretrained(args.model)
    ag_rows = read_ag_news(data / "ag_news" / "train.csv")
    kept, held = split_off(len(ag_rows), AG_VALID_FRACTION, 0)
    raw = {"train": ([ag_rows[i] for i in kept], read_conll(data / "conll2003" / "train.txt")),
           "valid": ([ag_rows[i] for i in held], read_conll(data / "conll2003" / "valid.txt")),
           "test": (read_ag_news(data / "ag_news" / "test.csv"), read_conll(data / "conll2003" / "test.txt"))}
    examples = {split: {"ag": tokenize_ag(tokenizer, ag, args.max_len), "ner": tokenize_ner(tokenizer, ner, args.max_len)}
                for split, (ag, ner) in raw.items()}
    collators = {"ag": transformers.DataCollatorWithPadding(tokenizer, return_tensors="pt"),
                 "ner": transformers.DataCollatorForTokenClassification(tokenizer, return_tensors="pt")}

    bert = transformers.BertModel.from_pretrained(args.model)
    model = TransformersModel(BertConfig.from_json(Path(args.model) / "config.json"), bert).to(device).train()
    num_layers = model.bert.config.num_hidden_layers
    rates = part_rates(num_layers, args.lr, 0.9, 1e-3)
    optimizer = torch.optim.AdamW(param_groups(model, rates, 0.01), fused=device.type == "cuda")
    sizes = {task: len(examples["train"][task]) for task in ("ag", "ner")}
    steps_per_epoch = len(epoch_batches(sizes, args.batch_size, np.random.default_rng(0)))
    total = args.epochs * steps_per_epoch
    warmup = int(0.1 * total)
    step, history, best, train_seconds = 0, [], None, 0.0
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        for task, indices in epoch_batches(sizes, args.batch_size, rng):
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, total, warmup)
            batch = to_batch(collators, examples["train"], task, indices, device)
            logits = model(batch["input_ids"], batch["attention_mask"], task)
            if task == "ag":
                loss = F.cross_entropy(logits.float(), batch["labels"])
            else:
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{total} | loss {task} {loss.item():.4f}", flush=True)
        train_seconds += time.perf_counter() - epoch_start
        scores = evaluate(model, collators, examples["valid"], raw["valid"][1], device, 2 * args.batch_size)
        history.append(scores)
        print(f"epoch {epoch + 1} valid: AG accuracy {scores['ag_accuracy']:.4f} | NER F1 {scores['ner_f1']:.4f}")
        score = scores["ag_accuracy"] + scores["ner_f1"]
        if best is None or score > best[0]:
            best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    test = evaluate(model, collators, examples["test"], raw["test"][1], device, 2 * args.batch_size)
    print(f"test: AG accuracy {test['ag_accuracy']:.4f} | NER F1 {test['ner_f1']:.4f}")
    summary = {"valid": history, "test": test, "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"train {train_seconds:.1f} s, total {summary['total_seconds']:.1f} s")


if __name__ == "__main__":
    main()
