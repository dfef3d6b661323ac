"""The multi-task job of train.py built the usual transformers way: the reference for its defaults.

Run by hand (it is not a test), next to train.py on the same data:

    python scripts/usual_job.py --model MODEL --data DATA --epochs 2 --out runs/usual
    python scripts/usual_job.py --model MODEL --data DATA --epochs 2 --rates ours --out runs/usual-our-rates
    python train.py --model MODEL --data DATA --epochs 2 --out runs/ours

The usual way, as transformers' examples build it:
- `BertModel.from_pretrained` and its fast tokenizer;
- batches in random order, each padded to its longest example
  (DataCollatorWithPadding, DataCollatorForTokenClassification), no grouping by length;
- AdamW with one flat rate for the whole encoder (--lr, 5e-5) and a higher one
  for the freshly initialized heads (--head-lr, 5e-4), linear warmup over 10%
  of the steps, then linear decay;
- --freeze backbone sets requires_grad off on the encoder and runs it on every
  step, in training mode (its dropout stays on), as a frozen BertModel usually is;
- on a GPU, bf16 autocast where the GPU has it (as train.py's --amp auto), else fp32.

`--rates ours` swaps in train.py's default rates (lr.py's layer-wise rates, head
rates, warmup and weight decay, whatever train.py's defaults are at the time),
so that the rates and the pipeline can be told apart.

The same as train.py, so that only the above differ: the data and its splits
(data.py's readers, the fixed 5% AG validation split), the two heads
(model.Head) on the chosen pooling, the loss, weight decay 0.01 off biases and
LayerNorms, clipping at 1.0, the epochs (data.MultiTaskSampler: min(task
sizes) examples from each task, the larger task walking through all of its
examples lap by lap, single-task batches in random order, here with no
grouping by length), the metrics (metrics.py, each word read at its first
piece as data.word_tags reads it) and the best epoch (highest mean of AG
accuracy and entity F1 on valid), whose weights are scored on test at the end.
It prints a line per 50 steps and per epoch and writes OUT/summary.json with
every epoch's validation scores, the rates and the timings.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import flags  # noqa: E402
import train  # noqa: E402
from support import readers  # noqa: E402
from data import MultiTaskSampler, split_off, word_tags  # noqa: E402
from support.tasks import NER_TAGS, SEED_TASKS, TASKS  # noqa: E402
from lr import lr_factor, part_rates  # noqa: E402
from support.metrics import accuracy, entity_counts, scores_from_counts  # noqa: E402
from model import POOLS, Head, pool_tokens  # noqa: E402
from support.runtime import write_json  # noqa: E402


class UsualModel(torch.nn.Module):
    """transformers' BertModel with train.py's two heads on the chosen pooling."""

    def __init__(self, bert, pool):
        super().__init__()
        self.bert, self.pool = bert, pool
        hidden = bert.config.hidden_size
        self.ag_head = Head(hidden, 4)
        self.ner_head = Head(hidden, 9)

    def forward(self, input_ids, attention_mask, task):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        if task == "ner":
            return self.ner_head(out.last_hidden_state)
        return self.ag_head(pool_tokens(out.last_hidden_state, out.pooler_output, attention_mask, self.pool))


def part_of(name):
    """transformers' parameter names -> the parts of lr.part_rates."""
    if name.startswith(("ag_head", "ner_head")):
        return name.split(".")[0]
    if name.startswith("bert.encoder.layer."):
        return "layer." + name.split(".")[3]
    return "pooler" if name.startswith("bert.pooler") else "embeddings"


def param_groups(model, rates, weight_decay):
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        decays = not (name.endswith(".bias") or "LayerNorm" in name or ".norm." in name)
        group = groups.setdefault((part, decays), {"params": [], "base_lr": rates[part],
                                                   "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
    return list(groups.values())


def job_rates(args, config):
    """(part -> base rate, warmup fraction, weight decay) of --rates usual or ours, for this backbone."""
    if args.rates == "usual":
        heads = {"ag_head": args.head_lr, "ner_head": args.head_lr}
        return part_rates(config.num_hidden_layers, args.lr, 1.0, heads), args.warmup, args.weight_decay
    ours = train.parse_args([])
    flags.resolve_auto_rates(ours, config)
    tasks = [TASKS[name] for name in SEED_TASKS]
    return train.base_rates(ours, config.num_hidden_layers, tasks), ours.warmup, ours.weight_decay


def read_ag_news(path):
    """AG News as [(text, class id 0-3)], read by readers.read_csv as train.py reads it."""
    return [(text, TASKS["ag"].labels.index(label)) for text, label in readers.read_csv(path, TASKS["ag"])]


def read_conll(path):
    return readers.read_conll(path, TASKS["ner"])


def tokenize_ag(tokenizer, rows, max_len):
    return [dict(tokenizer(text, truncation=True, max_length=max_len), labels=label) for text, label in rows]


def tokenize_ner(tokenizer, sentences, max_len):
    """Label the first piece of each word, -100 elsewhere: the usual token-classification recipe.
    Each example also keeps, per word, the position of its first piece (-1 if none is left)."""
    examples = []
    for words, tags in sentences:
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
        labels, previous, first = [], None, [-1] * len(words)
        for position, word in enumerate(encoded.word_ids()):
            starts = word is not None and word != previous
            labels.append(NER_TAGS.index(tags[word]) if starts else -100)
            if starts:
                first[word] = position
            previous = word
        examples.append(dict(encoded, labels=labels, first_piece=first))
    return examples


def to_batch(collators, examples, task, indices, device):
    rows = [{k: v for k, v in examples[task][i].items() if k != "first_piece"} for i in indices]
    return {k: v.to(device) for k, v in collators[task](rows).items()}


@torch.no_grad()
def evaluate(model, collators, examples, gold_sentences, device, batch_size, autocast):
    model.eval()
    predicted, gold = [], []
    for start in range(0, len(examples["ag"]), batch_size):
        batch = to_batch(collators, examples, "ag", range(start, min(start + batch_size, len(examples["ag"]))), device)
        with autocast():
            predicted += model(batch["input_ids"], batch["attention_mask"], "ag").argmax(-1).tolist()
        gold += batch["labels"].tolist()
    tags = []
    for start in range(0, len(examples["ner"]), batch_size):
        indices = range(start, min(start + batch_size, len(examples["ner"])))
        batch = to_batch(collators, examples, "ner", indices, device)
        with autocast():
            pieces = model(batch["input_ids"], batch["attention_mask"], "ner").argmax(-1).tolist()
        for row, i in enumerate(indices):
            tags.append(word_tags(pieces[row], examples["ner"][i]["first_piece"], NER_TAGS))  # a word with no piece: O
    scores = scores_from_counts(entity_counts([t for _, t in gold_sentences], tags))
    model.train()
    return {"ag_accuracy": accuracy(gold, predicted), "ner_f1": scores["f1"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="pretrained BERT folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--data", required=True, help="data directory in download.py's layout")
    p.add_argument("--out", required=True, help="output folder for summary.json")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--rates", choices=("usual", "ours"), default="usual",
                   help="usual: flat --lr for the encoder, --head-lr for the heads; ours: train.py's default rates")
    p.add_argument("--lr", type=float, default=5e-5, help="the whole encoder's rate (--rates usual)")
    p.add_argument("--head-lr", type=float, default=5e-4, help="both heads' rate (--rates usual)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear warmup (--rates usual)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's (--rates usual)")
    p.add_argument("--pool", choices=POOLS, default="mean")
    p.add_argument("--freeze", choices=("none", "backbone"), default="none")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # As train.py --amp auto: bf16 autocast on a GPU that has it, fp32 on the CPU (fp16 would need a scaler).
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    data = Path(args.data)
    config = json.loads((Path(args.model) / "config.json").read_text())
    problem = None
    if config.get("model_type", "bert") != "bert":
        problem = f"{args.model}: a {config['model_type']} model; this reference job builds BertModel only"
    elif args.max_len > config["max_position_embeddings"]:
        problem = (f"argument --max-len: {args.max_len} is more than the model's "
                   f"{config['max_position_embeddings']} positions")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    tokenizer = transformers.BertTokenizerFast.from_pretrained(args.model)
    ag_rows = read_ag_news(data / "ag_news" / "train.csv")
    kept, held = split_off(len(ag_rows), TASKS["ag"].valid_fraction, 0)
    raw = {"train": ([ag_rows[i] for i in kept], read_conll(data / "conll2003" / "train.txt")),
           "valid": ([ag_rows[i] for i in held], read_conll(data / "conll2003" / "valid.txt")),
           "test": (read_ag_news(data / "ag_news" / "test.csv"), read_conll(data / "conll2003" / "test.txt"))}
    examples = {split: {"ag": tokenize_ag(tokenizer, ag, args.max_len),
                        "ner": tokenize_ner(tokenizer, ner, args.max_len)} for split, (ag, ner) in raw.items()}
    collators = {"ag": transformers.DataCollatorWithPadding(tokenizer, return_tensors="pt"),
                 "ner": transformers.DataCollatorForTokenClassification(tokenizer, return_tensors="pt")}

    bert = transformers.BertModel.from_pretrained(args.model)
    model = UsualModel(bert, args.pool).to(device).train()
    if args.freeze == "backbone":
        model.bert.requires_grad_(False)
    rates, warmup_fraction, weight_decay = job_rates(args, bert.config)
    optimizer = torch.optim.AdamW(param_groups(model, rates, weight_decay), fused=device.type == "cuda")
    # train.py's epochs (min(task sizes) examples per task; the larger task walks through all its
    # examples lap by lap), in random batches with no grouping by length.
    lengths = {task: [len(x["input_ids"]) for x in examples["train"][task]] for task in ("ag", "ner")}
    sampler = MultiTaskSampler(lengths, args.batch_size, args.seed, group_window=0)
    total = sum(len(sampler.epoch(e)) for e in range(args.epochs))
    warmup = int(warmup_fraction * total)
    print(f"{args.rates} rates: " + " ".join(f"{part} {rate:.2e}" for part, rate in rates.items())
          + f" | warmup {warmup} of {total} steps | {torch.get_num_threads()} threads", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, history, best, train_seconds = 0, [], None, 0.0
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        for task, indices in sampler.epoch(epoch):
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, total, warmup)
            batch = to_batch(collators, examples["train"], task, indices, device)
            with autocast():
                logits = model(batch["input_ids"], batch["attention_mask"], task)
            if task == "ag":
                loss = F.cross_entropy(logits.float(), batch["labels"])
            else:
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{total} | loss {task} {loss.item():.4f}", flush=True)
        train_seconds += time.perf_counter() - epoch_start
        scores = evaluate(model, collators, examples["valid"], raw["valid"][1], device, 2 * args.batch_size, autocast)
        history.append(scores)
        print(f"epoch {epoch + 1} valid: AG accuracy {scores['ag_accuracy']:.4f} | NER F1 {scores['ner_f1']:.4f}",
              flush=True)
        score = (scores["ag_accuracy"] + scores["ner_f1"]) / 2
        if best is None or score > best[0]:
            best = (score, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    test = evaluate(model, collators, examples["test"], raw["test"][1], device, 2 * args.batch_size, autocast)
    print(f"test (epoch {best[1]}): AG accuracy {test['ag_accuracy']:.4f} | NER F1 {test['ner_f1']:.4f}")
    summary = {"valid": history, "best_epoch": best[1], "test": test, "config": vars(args), "rates": rates,
               "warmup": warmup_fraction, "weight_decay": weight_decay, "bf16": bf16,
               "threads": torch.get_num_threads(), "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "summary.json", summary)
    print(f"train {train_seconds:.1f} s, total {summary['total_seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
