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
import csv
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import load_tokenizer
from model import POOLS, load_pretrained, normalize_rows, pool_tokens


def pad(id_lists, max_len):
    """Right-pad lists of ids (cut to max_len, keeping the final [SEP]) into (ids, mask)."""
    id_lists = [ids if len(ids) <= max_len else ids[:max_len - 1] + ids[-1:] for ids in id_lists]
    width = max(map(len, id_lists))
    input_ids = torch.zeros(len(id_lists), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(id_lists):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    return input_ids, mask


@torch.no_grad()
def run_encoder(bert, id_lists, batch_size, max_len):
    """Hidden states and pooled vectors for every pooling mode, one forward pass per batch."""
    pooled = {pool: [] for pool in POOLS}
    lengths = []
    for start in range(0, len(id_lists), batch_size):
        input_ids, mask = pad(id_lists[start:start + batch_size], max_len)
        hidden, cls = bert(input_ids, mask)
        for pool in POOLS:
            pooled[pool].append(pool_tokens(hidden, cls, mask, pool))
        lengths.append(mask.sum(1))
    return {pool: torch.cat(v) for pool, v in pooled.items()}, torch.cat(lengths)


def read_ag(path, limit):
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(f"{title} {body}", int(label) - 1) for label, title, body in csv.reader(f)]
    return rows[:limit]


def knn_accuracy(vectors, labels, n_train, k):
    """Majority label of the k most similar training vectors (dot product), on the rest."""
    scores = vectors[n_train:] @ vectors[:n_train].T  # (queries, train)
    nearest = scores.topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(labels[:n_train][nearest], 4).sum(1)
    return (votes.argmax(1) == labels[n_train:]).float().mean().item()


def retrieval_study(bert, tokenizer, args):
    rows = read_ag(args.ag_news, args.ag_limit)
    random.Random(0).shuffle(rows)
    texts, labels = zip(*rows)
    labels = torch.tensor(labels)
    n_train = int(0.7 * len(rows))
    start = time.perf_counter()
    ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
    pooled, lengths = run_encoder(bert, ids, args.batch_size, args.max_len)
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


def read_conll(path):
    sentences, words, tags = [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                sentences.append((words, tags))
            words, tags = [], []
        else:
            parts = line.split()
            words.append(parts[0])
            tags.append(parts[-1])
    return sentences


@torch.no_grad()
def dilution_study(bert, tokenizer, args):
    """Swap one single-word location for a person's name; compare token and sentence change."""
    swaps = []
    for words, tags in read_conll(args.conll):
        for i, tag in enumerate(tags):
            single = tag == "B-LOC" and (i + 1 == len(tags) or tags[i + 1] != "I-LOC")
            if single and len(words) >= 4:
                swaps.append((words, i))
                break
    random.Random(0).shuffle(swaps)
    swaps = swaps[:args.conll_limit]
    bins = {"4-10 words": [], "11-25 words": [], "26+ words": []}
    for words, i in swaps:
        changed = words[:i] + ["Smith"] + words[i + 1:]
        encodings = [tokenizer.encode(w, is_pretokenized=True) for w in (words, changed)]
        input_ids, mask = pad([e.ids for e in encodings], args.max_len)
        hidden, cls = bert(input_ids, mask)
        positions = [e.word_ids.index(i) for e in encodings]  # first piece of the swapped word
        if max(positions) >= hidden.shape[1]:
            continue
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
    rows = read_ag(args.ag_news, 512)
    pairs = [tokenizer.encode(a[0], b[0]).ids for a, b in zip(rows[::2], rows[1::2])]
    start = time.perf_counter()
    run_encoder(bert, pairs, args.batch_size, args.max_len * 2)
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
