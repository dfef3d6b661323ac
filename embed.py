"""Task 1 on the command line: sentence embeddings and their cosine similarities.

    python embed.py --model DIR --pool max --normalize l2 "a sentence" "another"
    python embed.py --model runs/bi "a sentence" "another"   # a run of pairs.py or train.py, as trained
    python embed.py --model ST_DIR "a sentence"              # a sentence-transformers folder, as its modules.json says
    python embed.py --model DIR --json "a sentence"          # the vectors as JSON
    cat sentences.txt | python embed.py --model DIR          # one sentence per line

Up to TABLE_LIMIT sentences print as a table of every pair's cosine; more print one line each, with the
nearest other sentence.
"""

from support import cpu_threads  # noqa: F401  first: before torch starts, how its CPU threads wait

import argparse
import json
import sys
from pathlib import Path

import torch

from support import interop
from data import load_tokenizer
from model import NORMS, POOLS, SentenceEncoder
from support.model_folder import check_fits, load_multitask, load_pretrained, pooling_note, read_config, trained_settings
from support.runtime import (CheckpointError, DataError, HelpFormatter, UsageError, check_arguments_utf8, exit_status_of,
                     pick_device)
from support.sentence_pairs import load_pairs


TABLE_LIMIT = 12  # most sentences printed as a table of every pair's cosine: 12 columns of 8 characters make a
# 101-character row, and with its 12 sentence lines the table fills a screen. Past that nobody reads it, and it
# grows as N x N (20,000 sentences: 2.1 GB of text); each sentence gets one line instead, with its nearest other one.
BLOCK = 2**22  # cosines held at once while finding the nearest: 16 MB of float32, whatever the number of sentences


def at_least(low):
    """An argparse type: an integer no smaller than low."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Embed sentences with a BERT model folder and compare them.",
                                formatter_class=HelpFormatter)
    p.add_argument("sentences", nargs="*", help="sentences to embed (default: one per line on stdin)")
    p.add_argument("--model", required=True, help="BERT folder: config.json, model.safetensors, "
                                                  "tokenizer.json or vocab.txt")
    p.add_argument("--pool", choices=POOLS, default=None, help="mean of token states, the [CLS] pooler output, or "
                                                               "max over tokens (default: the folder's own, for a "
                                                               "run of pairs.py or train.py or a sentence-"
                                                               "transformers folder; else mean)")
    p.add_argument("--embed-dim", type=at_least(1), default=None,
                   help="add a linear projection to this size (random until trained; seeded by --seed)")
    p.add_argument("--normalize", choices=NORMS, default=None, help="divide by the L1 or L2 norm (default: the "
                                                                    "folder's own, as for --pool; else none)")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="sentences per forward pass")
    p.add_argument("--max-len", type=at_least(2), default=None,
                   help="cut inputs to this many word pieces (default: max_seq_length from the folder's "
                        "sentence_bert_config.json, else max_position_embeddings)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda where there is one")
    p.add_argument("--seed", type=int, default=0, help="seeds the random projection of --embed-dim")
    p.add_argument("--json", action="store_true", help="print the vectors as JSON instead of the similarities")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda was asked for, but no CUDA device is available")
    return args


def unit_vectors(vectors):
    """Each vector divided by its length (a zero vector stays zero): their dot products are cosines."""
    return vectors / vectors.norm(dim=1, keepdim=True).clamp(min=torch.finfo(vectors.dtype).tiny)


def similarity_table(sentences, vectors):
    """Cosine similarity of every pair, as rows of text with one label per sentence."""
    unit = unit_vectors(vectors)
    cos = unit @ unit.T  # (N, N)
    lines = ["     " + "".join(f"{f'[{j}]':>8}" for j in range(len(sentences)))]
    for i, row in enumerate(cos.tolist()):
        lines.append(f"{f'[{i}]':<5}" + "".join(f"{c:8.3f}" for c in row))
    lines += [f"[{i}] {s}" for i, s in enumerate(sentences)]
    return "\n".join(lines)


def nearest_table(sentences, vectors):
    """For each sentence, the nearest other one and their cosine, one line each. The cosines are
    computed BLOCK at a time, a few rows of the N x N matrix, so memory does not grow as N x N."""
    unit = unit_vectors(vectors)
    label = len(f"[{len(sentences) - 1}]") + 1
    lines = [f"{'':<{label}}{'nearest':>8}{'cosine':>8}"]
    rows = max(1, BLOCK // len(sentences))
    for start in range(0, len(sentences), rows):
        cos = unit[start:start + rows] @ unit.T  # (rows, N)
        cos.diagonal(start).fill_(float("-inf"))  # cos[i, start + i] is sentence start + i with itself
        best, nearest = cos.max(dim=1)
        for i, (c, j) in enumerate(zip(best.tolist(), nearest.tolist()), start=start):
            lines.append(f"{f'[{i}]':<{label}}{f'[{j}]':>8}{c:8.3f}  {sentences[i]}")
    return "\n".join(lines)


def read_sentences(args):
    """The sentences: the arguments, or else the non-empty lines of standard input; text that is not UTF-8
    is an error that names the sentence."""
    check_arguments_utf8(args.sentences, "sentence")
    return args.sentences or read_stdin()


def read_stdin():
    """Non-empty lines of standard input; bytes that are not UTF-8 are an error. Lines end where
    str.splitlines ends them, "\\r\\n" included, and a byte-order mark is not part of the first line."""
    try:
        text = sys.stdin.buffer.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"standard input: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    return [line for line in text.splitlines() if line.strip()]


def default_max_len(model_dir, config):
    """sentence-transformers models cap inputs below the position limit (256 for
    all-MiniLM-L6-v2) in sentence_bert_config.json; use that cap where it exists."""
    path = Path(model_dir) / "sentence_bert_config.json"
    if not path.exists():
        return config.max_len
    try:
        cap = json.loads(path.read_text()).get("max_seq_length", config.max_len)
    except (ValueError, AttributeError, OSError) as e:
        raise CheckpointError(f"{path}: not a JSON object ({e})") from None
    if not (isinstance(cap, int) and 2 <= cap <= config.max_len):
        raise CheckpointError(f"{path}: max_seq_length must be a whole number from 2 to "
                              f"{config.max_len}, found {cap!r}")
    return cap


def pairs_settings(model_dir):
    """The settings of a bi-encoder trained by pairs.py, or None for any other folder; a cross-encoder
    scores pairs, not sentences, and is refused."""
    settings = trained_settings(model_dir, "pairs")
    if settings is not None and settings.get("kind") != "bi":
        raise CheckpointError(f"{model_dir}: holds a cross-encoder, which scores sentence pairs in one pass and "
                              "gives no embedding of a sentence alone; use `python pairs.py` to score pairs")
    return settings


def sentence_encoder(args):
    """The SentenceEncoder the flags ask for, its weights read once, and the BertConfig as those weights have
    it (a sentence-transformers folder may set or remove the pooler). A folder with a sentence vector of its
    own gives it: a bi-encoder of pairs.py and a run of train.py (config.json), a sentence-transformers folder
    (its modules.json, interop.py); --pool and --normalize change it, and a note says so. A plain BERT folder
    gets the flags' vector."""
    model_dir = args.model
    read_config(Path(model_dir) / "config.json")  # a bad config.json is named first, before its settings are read
    if pairs_settings(model_dir) is not None:
        encoder, source = load_pairs(model_dir).encoder, f"{model_dir} is a bi-encoder trained with"
        config = encoder.bert.config
    elif trained_settings(model_dir, "multitask") is not None:
        encoder, source = load_multitask(model_dir).encoder, f"{model_dir} is a train.py run trained with"
        config = encoder.bert.config
    else:
        bert = load_pretrained(model_dir)
        config = bert.config  # before a sentence-transformers folder sets or removes the pooler
        modules = interop.read_modules(model_dir, config.hidden_size)
        if modules is None:
            return SentenceEncoder(bert, args.pool or "mean", args.embed_dim, args.normalize or "none"), config
        encoder, source = modules.encoder(bert), f"{modules.path} gives"
    embed_dim = None if encoder.project is None else encoder.embed_dim
    if args.embed_dim is not None and args.embed_dim != embed_dim:
        raise UsageError(f"argument --embed-dim: {source} "
                         f"{'no --embed-dim' if embed_dim is None else f'--embed-dim {embed_dim}'}; leave --embed-dim out")
    for flag, name in (("pool", "pool"), ("normalize", "norm")):
        value = getattr(args, flag)
        if value is not None and value != getattr(encoder, name):
            print(f"note: {source} --{flag} {getattr(encoder, name)}; using --{flag} {value}", file=sys.stderr)
            setattr(encoder, name, value)
    return encoder, config


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)  # on CUDA also without cuDNN's attention (runtime.pick_device)
    torch.manual_seed(args.seed)
    try:
        sentences = read_sentences(args)
        if not sentences:
            raise DataError("no sentences given (pass them as arguments or on stdin)")
        tokenizer = load_tokenizer(args.model)
        encoder, config = sentence_encoder(args)
        max_len = args.max_len or default_max_len(args.model, config)
        check_fits(tokenizer, config, max_len, args.model)
        encoder = encoder.to(device)
    except (CheckpointError, DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note := pooling_note(config, encoder.pool):
        print(note, file=sys.stderr)
    vectors = encoder.encode(sentences, tokenizer, batch_size=args.batch_size, max_len=max_len)
    if args.json:
        print(json.dumps({"pool": encoder.pool, "normalize": encoder.norm, "embed_dim": encoder.embed_dim,
                          "max_len": max_len, "sentences": sentences, "embeddings": vectors.tolist()}))
    else:
        print(f"embedding size: {encoder.embed_dim} (pool={encoder.pool}, normalize={encoder.norm}, "
              f"max_len={max_len}, {len(sentences)} sentences, {device})")
        if len(sentences) <= TABLE_LIMIT:
            print(similarity_table(sentences, vectors))
        else:
            print(f"more than {TABLE_LIMIT} sentences: the nearest other sentence of each, instead of a table of "
                  "every pair; --json > FILE writes the vectors")
            print(nearest_table(sentences, vectors))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status_of(main))
