"""A trained multi-task model on new text: each task's answer, e.g. the topic (AG News) and the entities (CoNLL-2003).

    python predict.py --model runs/NAME "Apple opened a store in London."
    python predict.py --model runs/NAME --json < texts.txt      # one text per line

--model is a run folder that train.py wrote (weights, config.json with the
heads' settings and tasks, and the tokenizer files). A sentence-level task
(the topic) reads the whole text, tokenized as in training. A word-level
task was trained on CoNLL-style words, so the text is first cut into words
the way CoNLL-2003 is (split_words) and tagged one tag per word (the tag of
its first word piece, as in evaluation); an entity task's tags are read
into entities with the chunk rules of metrics.py (conlleval's). Each entity
and word carries its character offsets: text[start:end] is the entity.
"""

from support import cpu_threads  # noqa: F401  first: before torch starts, how its CPU threads wait

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from data import collate, encode, length_batches, load_tokenizer, word_tags
from support.metrics import chunks
from support.model_folder import check_fits, load_multitask
from support.runtime import (CheckpointError, DataError, HelpFormatter, UsageError, check_arguments_utf8, exit_status_of,
                     pick_device)


ABBREVIATION = re.compile(r"(?:[^\W\d_]\.){2,}")  # U.S., e.g.


def split_words(text):
    """The text as CoNLL-style words, each with its character span: [(word, start, end)].

    Whitespace separates chunks. Punctuation at either end of a chunk is split
    off, one character per word: "(London.)" gives "(", "London", ".", ")".
    An abbreviation of single letters keeps its final period ("U.S.", "e.g."),
    and a final possessive "'s" is a word of its own, as in CoNLL-2003
    ("Germany's" gives "Germany", "'s"). Punctuation inside a chunk stays:
    "co-founder", "3.5", "AT&T". Offsets count characters (Unicode code
    points, as Python indexes a str).
    """
    words = []
    for match in re.finditer(r"\S+", text):
        start, end = match.span()
        lead, trail = [], []
        while start < end and not text[start].isalnum():
            lead.append((start, start + 1))
            start += 1
        while start < end and not text[end - 1].isalnum() and not ABBREVIATION.fullmatch(text, start, end):
            trail.append((end - 1, end))
            end -= 1
        if end - start > 2 and text[end - 2:end].lower() in ("'s", "\u2019s"):
            trail.append((end - 2, end))
            end -= 2
        spans = lead + ([(start, end)] if start < end else []) + trail[::-1]
        words += [(text[a:b], a, b) for a, b in spans]
    return words


@torch.no_grad()
def head_outputs(model, part, device, batch_size, pad_id):
    """Per example of a TaskData, its task's logits on the CPU: (labels,) at sentence level, (T, labels) at
    word level."""
    out = [None] * len(part)
    for indices in length_batches(part.lengths(), batch_size):
        batch = collate(part, indices, pad_id)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), part.task.name)
        logits = logits.float().cpu()  # one copy from the device per batch
        for row, i in enumerate(indices):
            out[i] = logits[row]
    return out


def predict(model, tokenizer, texts, max_len, batch_size=32, warn=None):
    """Per text, {"text", and per task of the model, under its key (tasks.Task.key): a sentence-level task's
    label and "<key>_scores" (softmax); an entity task's [{"text", "type", "start", "end"}]; another word-level
    task's [{"text", "tag", "start", "end"}] per word}, on the model's device. warn(message) is told about
    each text cut at max_len word pieces."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = model.bert.config.pad_token_id
    words = [split_words(text) for text in texts]
    results, cut, lost = [{"text": text} for text in texts], [False] * len(texts), [0] * len(texts)
    tagged = "entity" if any(t.metric == "entity_f1" for t in model.tasks.values()) else "word"
    for task in model.tasks.values():
        if task.level == "sentence":
            part = encode([(text, task.labels[0]) for text in texts], task, tokenizer, max_len)
        else:
            part = encode([([w for w, _, _ in ws], [task.labels[0]] * len(ws)) for ws in words], task, tokenizer, max_len)
        for n, (logits, ws) in enumerate(zip(head_outputs(model, part, device, batch_size, pad_id), words)):
            cut[n] |= part.truncated[n]
            if task.level == "sentence":
                scores = dict(zip(task.labels, logits.softmax(-1).tolist()))
                results[n] |= {task.key: max(scores, key=scores.get), f"{task.key}_scores": scores}
                continue
            tags = word_tags(logits.argmax(-1).tolist(), part.first_piece[n], task.labels)
            if task.metric == "entity_f1":
                results[n][task.key] = [{"text": text_of(texts[n], ws, a, b), "type": kind, "start": ws[a][1],
                                         "end": ws[b][2]} for kind, a, b in sorted(chunks(tags), key=lambda c: c[1])]
            else:
                results[n][task.key] = [{"text": w, "tag": t, "start": a, "end": b} for (w, a, b), t in zip(ws, tags)]
            lost[n] = sum(p < 0 for p in part.first_piece[n])  # words with no piece left (the same for every
            # word-level task: they cut the same words)
    for n in range(len(texts)):
        if warn and cut[n]:
            warn(f"text {n + 1} is longer than {max_len} word pieces: cut there"
                 + (f"; its last {lost[n]} words get no {tagged} tags" if lost[n] else ""))
    return results


def text_of(text, words, first, last):
    """The characters of words[first] to words[last] in the text."""
    return text[words[first][1]:words[last][2]]


def show(result):
    """A result as readable lines: the text, then a line per task."""
    lines = [result["text"]]
    for key, value in result.items():
        if key == "text" or key.endswith("_scores"):
            continue
        if isinstance(value, str):
            lines.append(f"  {key}: {value} ({result[key + '_scores'][value]:.3f})")
        elif value and "type" in value[0] or not value:
            lines.append(f"  {key}: " + (", ".join(f"{e['text']} {e['type']} [{e['start']}:{e['end']}]"
                                                    for e in value) or "none"))
        else:
            lines.append(f"  {key}: " + " ".join(f"{w['text']}/{w['tag']}" for w in value))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Topic and named entities of new text, from a model train.py trained.",
                                formatter_class=HelpFormatter)
    p.add_argument("texts", nargs="*", help="texts to read; none: one text per line on stdin (blank lines skipped)")
    p.add_argument("--model", required=True, help="a run folder written by train.py")
    p.add_argument("--json", action="store_true", help="one JSON object per text instead of readable lines")
    p.add_argument("--max-len", type=int, default=None,
                   help="word pieces per text, [CLS] and [SEP] included (default: the run's --max-len)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda where there is one")
    return p.parse_args(argv)


def read_inputs(args):
    """The texts, from the arguments or stdin; an empty one is a UsageError, and one that is not UTF-8
    names the text (or stdin's line). Lines of stdin lose their line ending, a carriage return included,
    and the first line its byte-order mark (Windows editors write both): neither is part of the text."""
    if args.texts:
        texts = args.texts
        check_arguments_utf8(texts, "text")
    elif sys.stdin.isatty():
        raise UsageError("no texts: give them as arguments, or one per line on stdin")
    else:
        raw = sys.stdin.buffer.read()
        try:
            lines = raw.decode("utf-8-sig").split("\n")  # only "\n" ends a text, as in the line numbers here
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"<stdin>:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
        texts = [line.removesuffix("\r") for line in lines if line.strip()]
    for n, text in enumerate(texts, start=1):
        if not text.strip():
            raise UsageError(f"text {n} is empty")
    if not texts:
        raise UsageError("no texts: stdin held only blank lines")
    return texts


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UsageError(f"argument --batch-size: must be at least 1, got {args.batch_size}")
        if not Path(args.model).is_dir():
            raise UsageError(f"argument --model: {args.model} is not a folder; give a run folder written by train.py")
        device = pick_device(args.device)
        model = load_multitask(args.model, device)  # a plain BERT folder fails here, with a hint
        tokenizer = load_tokenizer(args.model)
        run = json.loads((Path(args.model) / "config.json").read_text()).get("run", {})
        max_len = run.get("max_len", 128) if args.max_len is None else args.max_len
        if max_len < 3:
            raise UsageError(f"argument --max-len: must be at least 3, got {max_len}")
        check_fits(tokenizer, model.bert.config, max_len, args.model)
        texts = read_inputs(args)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = predict(model, tokenizer, texts, max_len, args.batch_size,
                      warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    for result in results:
        print(json.dumps(result, ensure_ascii=False) if args.json else show(result))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status_of(main))
