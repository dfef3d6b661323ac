"""The measurements behind the README's Task 1 section.

    python scripts/pooling_study.py --model DIR --ag-news train.csv --conll valid.txt

Uses a real model folder and real data files (nothing here is downloaded) and
prints markdown tables:
  1. topic retrieval on AG News: k-nearest-neighbour accuracy of frozen
     embeddings for each pooling and normalization (dot-product similarity);
  2. how vector norms depend on sentence length, per pooling;
  3. dilution: how much one swapped entity word moves the token state at that
     word, and how much it moves the pooled sentence vector, by sentence length;
  4. bi-encoder vs cross-encoder cost, from measured encoding throughput.
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import TaskData, collate, encode, load_tokenizer
from support.readers import read_conll, read_csv
from support.tasks import TASKS
from model import POOLS, normalize_rows, pool_tokens
from support.model_folder import load_pretrained


@torch.no_grad()
def run_encoder(bert, part, batch_size):
    """The pooled vectors of every example for every pooling mode, one forward pass per batch."""
    pooled = {pool: [] for pool in POOLS}
    for start in range(0, len(part), batch_size):
        batch = collate(part, list(range(start, min(start + batch_size, len(part)))))
        hidden, cls = bert(batch["input_ids"], batch["attention_mask"])
        for pool in POOLS:
            pooled[pool].append(pool_tokens(hidden, cls, batch["attention_mask"], pool))
    return {pool: torch.cat(v) for pool, v in pooled.items()}


def knn_accuracy(vectors, labels, n_train, k):
    """Majority label of the k most similar training vectors (dot product), on the rest."""
    scores = vectors[n_train:] @ vectors[:n_train].T  # (queries, train)
    nearest = scores.topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(labels[:n_train][nearest], 4).sum(1)
    return (votes.argmax(1) == labels[n_train:]).float().mean().item()


def retrieval_study(bert, tokenizer, args):
    rows = read_csv(args.ag_news, TASKS["ag"])[:args.ag_limit]
    random.Random(0).shuffle(rows)
    labels = torch.tensor([TASKS["ag"].labels.index(label) for _, label in rows])
    n_train = int(0.7 * len(rows))
    start = time.perf_counter()
    part = encode(rows, TASKS["ag"], tokenizer, args.max_len)
    pooled = run_encoder(bert, part, args.batch_size)
    lengths = torch.tensor(part.lengths())
    seconds = time.perf_counter() - start
    print(f"\n## 1. AG News topic retrieval: {args.k}-NN accuracy, {n_train} neighbours, "
          f"{len(rows) - n_train} queries (dot-product similarity)\n")
    print("| pooling | no normalization | L1 | L2 (= cosine) |\n|---|---|---|---|")
    for pool in POOLS:
        accs = [knn_accuracy(normalize_rows(pooled[pool], norm), labels, n_train, args.k) for norm in ("none", "l1", "l2")]
        print(f"| {pool} | " + " | ".join(f"{a:.1%}" for a in accs) + " |")
    print("\n## 2. Vector norms against length (word pieces)\n")
    print("| pooling | mean L2 norm | min | max | correlation of norm with length |\n|---|---|---|---|---|")
    for pool in POOLS:
        norms = pooled[pool].norm(dim=1)
        corr = torch.corrcoef(torch.stack([norms, lengths.float()]))[0, 1].item()
        print(f"| {pool} | {norms.mean():.2f} | {norms.min():.2f} | {norms.max():.2f} | {corr:+.2f} |")
    return len(rows) / seconds, lengths.float().mean().item()


@torch.no_grad()
def dilution_study(bert, tokenizer, args):
    """Swap one single-word location for a person's name; compare token and sentence change."""
    swaps = []
    for words, tags in read_conll(args.conll, TASKS["ner"]):
        for i, tag in enumerate(tags):
            single = tag == "B-LOC" and (i + 1 == len(tags) or tags[i + 1] != "I-LOC")
            if single and len(words) >= 4:
                swaps.append((words, tags, i))
                break
    random.Random(0).shuffle(swaps)
    swaps = swaps[:args.conll_limit]
    bins = {"4-10 words": [], "11-25 words": [], "26+ words": []}
    for words, tags, i in swaps:
        changed = words[:i] + ["Smith"] + words[i + 1:]
        part = encode([(words, tags), (changed, tags)], TASKS["ner"], tokenizer, args.max_len)
        positions = [part.first_piece[k][i] for k in (0, 1)]  # first piece of the swapped word
        if min(positions) < 0:  # cut off at max_len
            continue
        batch = collate(part, [0, 1])
        mask = batch["attention_mask"]
        hidden, cls = bert(batch["input_ids"], mask)
        cos = torch.nn.functional.cosine_similarity
        token = cos(hidden[0, positions[0]], hidden[1, positions[1]], dim=0).item()
        row = {"token": token}
        for pool in POOLS:
            v = pool_tokens(hidden, cls, mask, pool)
            row[pool] = cos(v[0], v[1], dim=0).item()
        n = len(words)
        bins["4-10 words" if n <= 10 else "11-25 words" if n <= 25 else "26+ words"].append(row)
    print(f"\n## 3. Dilution: one location swapped for 'Smith' in {sum(map(len, bins.values()))} "
          "CoNLL-2003 sentences; cosine between before and after (1 = unchanged)\n")
    print("| sentence length | sentences | token state at the word | mean-pooled | max-pooled | CLS |")
    print("|---|---|---|---|---|---|")
    for name, rows in bins.items():
        if rows:
            avg = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
            print(f"| {name} | {len(rows)} | {avg['token']:.3f} | {avg['mean']:.3f} | {avg['max']:.3f} | "
                  f"{avg['cls']:.3f} |")


def cost_study(bert, tokenizer, rate_single, mean_len, args):
    rows = read_csv(args.ag_news, TASKS["ag"])[:512]
    pairs = [tokenizer.encode(a[0], b[0]).ids for a, b in zip(rows[::2], rows[1::2])]  # [CLS] a [SEP] b [SEP]
    start = time.perf_counter()
    run_encoder(bert, TaskData(TASKS["ag"], pairs, [0] * len(pairs), [False] * len(pairs)), args.batch_size)
    rate_pairs = len(pairs) / (time.perf_counter() - start)
    queries, docs = 1_000, 100_000
    bi = (queries + docs) / rate_single
    cross = queries * docs / rate_pairs
    print(f"\n## 4. Bi-encoder vs cross-encoder, {queries:,} queries x {docs:,} documents\n")
    print(f"Measured: {rate_single:.0f} single texts/s (mean {mean_len:.0f} word pieces), "
          f"{rate_pairs:.0f} text pairs/s, batch {args.batch_size}, {torch.get_num_threads()} threads.\n")
    print(f"- bi-encoder: encode {queries + docs:,} texts once = {bi / 60:.1f} min, then one matrix product")
    print(f"- cross-encoder: {queries * docs:,} pair passes = {cross / 3600:.0f} h ({cross / bi:.0f}x)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ag-news", required=True, help="AG News train.csv")
    p.add_argument("--conll", required=True, help="a CoNLL-2003 file, e.g. valid.txt")
    p.add_argument("--ag-limit", type=int, default=5600)
    p.add_argument("--conll-limit", type=int, default=600)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    bert = load_pretrained(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    print(f"model: {args.model} ({bert.config.num_hidden_layers} layers, hidden {bert.config.hidden_size})")
    rate, mean_len = retrieval_study(bert, tokenizer, args)
    dilution_study(bert, tokenizer, args)
    cost_study(bert, tokenizer, rate, mean_len, args)


if __name__ == "__main__":
    main()
