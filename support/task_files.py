"""train.py --tasks: built-in task names (tasks.TASKS) and JSON files of one's own tasks, as tasks.Task rows.

    --tasks ag,ner                 the seed's two (the default)
    --tasks ag,ner,pos             with CoNLL-2003's POS tags as a third task
    --tasks ag,ner,my_tasks.json   with the tasks that file describes

A task file holds one task object, or a list of them, with the fields of
tasks.Task (docs/own-task.md shows one):

    [{"name": "sentiment", "level": "sentence", "files": {"train": "reviews.tsv", "test": "reviews_test.tsv"},
      "format": "tsv", "text": [2], "label": 0, "header": true},
     {"name": "chunks", "level": "word", "metric": "entity_f1", "files": {"train": "chunks.txt", ...},
      "label": 2}]

Columns count from 0; a negative one counts from the end. Defaults: format
csv (sentence level) or conll (word level); metric accuracy or
token_accuracy; text [0]; label -1 (the last column); labels: those of the
train file, sorted. Relative file paths are read from the task file's folder.
Anything else is a UsageError naming the file and the line of its task.
"""

import json
import re
from dataclasses import fields
from pathlib import Path

from support.runtime import UsageError, read_text
from support.tasks import LEVELS, TASKS, Task

NAME = re.compile(r"[a-z][a-z0-9_]*")  # a head's part is "<name>_head", a score "<name>_accuracy"
FIELDS = {f.name for f in fields(Task)} - {"valid_fraction"}  # that one is train.py's --valid-fraction
FORMATS = {"sentence": ("csv", "tsv"), "word": ("conll",)}


def parse_tasks(spec):
    """--tasks "ag,ner,FILE.json" -> [Task], in the order given; UsageError names the flag or the file."""
    tasks = []
    for item in (item.strip() for item in spec.split(",")):
        if item in TASKS:
            tasks.append(TASKS[item])
        elif item.endswith(".json"):
            tasks += read_task_file(Path(item))
        else:
            raise UsageError(f"argument --tasks: {item!r} is neither a built-in task ({', '.join(TASKS)}) nor a "
                             "task file (.json)")
    names = [t.name for t in tasks]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"argument --tasks: two tasks are named {twice[0]!r}")
    return tasks


def read_task_file(path):
    """The tasks a JSON file describes, their relative paths read from its folder."""
    if not path.is_file():
        raise UsageError(f"argument --tasks: {path}: not found")
    text = read_text(path)
    try:
        objects = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    objects = objects if isinstance(objects, list) else [objects]
    lines = _object_lines(text, len(objects))
    return [_task(item, f"{path}:{line}", path.parent) for item, line in zip(objects, lines)]


def _object_lines(text, count):
    """The line on which each of the file's task objects begins (the first "{" from each one on)."""
    starts, at = [], 0
    for _ in range(count):
        at = text.index("{", at) if "{" in text[at:] else at
        starts.append(text.count("\n", 0, at) + 1)
        try:
            at = json.JSONDecoder().raw_decode(text, at)[1]
        except json.JSONDecodeError:
            at += 1
    return starts


def _task(item, where, folder):
    """One task object -> Task, its files resolved against folder."""
    if not isinstance(item, dict):
        raise UsageError(f"{where}: a task is a JSON object of {', '.join(sorted(FIELDS))}")
    if unknown := sorted(set(item) - FIELDS):
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (a task has {', '.join(sorted(FIELDS))})")
    name, level = item.get("name"), item.get("level")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"{where}: name must be lower-case letters, digits and _, starting with a letter; got {name!r}")
    where = f"{where}: task {name!r}"
    if level not in LEVELS:
        raise UsageError(f"{where}: level must be one of {', '.join(LEVELS)}, got {level!r}")
    metric = item.get("metric", LEVELS[level][-1])
    if metric not in LEVELS[level]:
        raise UsageError(f"{where}: metric of a {level}-level task is one of {', '.join(LEVELS[level])}, got {metric!r}")
    form = item.get("format", FORMATS[level][0])
    if form not in FORMATS[level]:
        raise UsageError(f"{where}: format of a {level}-level task is one of {', '.join(FORMATS[level])}, got {form!r}")
    files = item.get("files")
    if not isinstance(files, dict) or not {"train", "test"} <= set(files) or not set(files) <= {"train", "valid", "test"}:
        raise UsageError(f"{where}: files must map train and test (and valid, if there is one) to paths; got {files!r}")
    if not all(isinstance(p, str) and p for p in files.values()):
        raise UsageError(f"{where}: every file must be a path (a string)")
    text = item.get("text", [0])
    text = [text] if isinstance(text, int) else text
    label = item.get("label", -1)
    if not (isinstance(text, list) and text and all(type(c) is int for c in text)) or type(label) is not int:
        raise UsageError(f"{where}: text is a column number or a list of them, label a column number")
    if level == "word" and len(text) != 1:
        raise UsageError(f"{where}: a word-level task reads its words from one column, got text {text}")
    labels = item.get("labels")
    if labels is not None and not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)
                                   and len(set(labels)) == len(labels)):
        raise UsageError(f"{where}: labels must be a list of distinct strings")
    for flag in ("header",):
        if not isinstance(item.get(flag, False), bool):
            raise UsageError(f"{where}: {flag} must be true or false")
    if not isinstance(item.get("output", name), str):
        raise UsageError(f"{where}: output must be a string")
    return Task(name, level, metric, None if labels is None else tuple(labels), item.get("output"),
                {split: str(folder.resolve() / p) for split, p in files.items()}, form, tuple(text), label,
                header=item.get("header", False))
