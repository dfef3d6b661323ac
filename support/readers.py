"""Reading a task's files into examples: CSV or TSV rows (a label per text) and CoNLL columns (a tag per word).

data.py tokenizes what these return. Every check names the file and the
line: too few columns, a label the task does not have, an empty file. How a
file is read (which columns, a header row, AG News's cleaning) is the task's
row of the table (tasks.Task).
"""

import csv
import io
import re

from support.runtime import DataError, read_text

# AG News was scraped from HTML and stored with some damage. The `&` of HTML
# entities was lost (leaving " #39;" for an apostrophe), "$" was escaped as
# "\$", and line breaks inside a description became a lone backslash.
_AG_ENTITIES = {"#39": "'", "quot": '"', "amp": "&", "#36": "$"}
_AG_ENTITY = re.compile(r" ?(?<![\w&])(#39|quot|amp|#36);")  # not inside a word ("camp;"), not "&amp;"


def clean_ag_text(text):
    """Undo the AG News artefacts above, then collapse runs of spaces."""
    text = text.replace("\\$", "$")
    text = re.sub(r"\\+", " ", text)  # a backslash line join: "on\Wednesday" -> "on Wednesday"
    text = _AG_ENTITY.sub(lambda m: _AG_ENTITIES[m.group(1)], text)
    return re.sub(r"\s+", " ", text).strip()


def read_examples(path, task):
    """A file of a task -> [(text, label)] (sentence level: read_csv) or [(words, tags)] (word level:
    read_conll), labels by name. With task.labels given, any other label is a DataError naming the line."""
    return read_conll(path, task) if task.format == "conll" else read_csv(path, task)


def _label(value, task, where):
    """A label as the file spells it -> its name; a DataError if the task's labels do not hold it."""
    if task.codes:
        if value not in task.codes:
            raise DataError(f"{where}: label must be one of {', '.join(task.codes)}, found {value!r}")
        return task.labels[task.codes.index(value)]
    if task.labels is not None and value not in task.labels:
        raise DataError(f"{where}: label {value!r} is not among {task.name}'s labels "
                        f"({', '.join(task.labels[:12])}{', ...' if len(task.labels) > 12 else ''})")
    return value


def columns_needed(task):
    """The fewest columns a line of the task's files can have: its text columns, and its label column
    apart from them (a negative one counts from the end)."""
    text = max(task.text) + 1
    return max(text, task.label + 1) if task.label >= 0 else text - task.label


def read_csv(path, task):
    """CSV or TSV rows -> [(the text columns joined by a space, label)], the label column read as it is."""
    rows, need = [], columns_needed(task)
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t" if task.format == "tsv" else ",")
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if task.header and reader.line_num == 1:
                continue
            if len(row) < need:
                raise DataError(f"{where}: expected {need} columns, found {len(row)}")
            text = " ".join(row[c] for c in task.text)
            rows.append((clean_ag_text(text) if task.clean else text, _label(row[task.label], task, where)))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def to_iob2(tags):
    """IOB1 -> IOB2: an entity that starts with I- (after O or another type) starts with B- instead.

    IOB1 uses B- only between two adjacent entities of one type; IOB2 opens
    every entity with B-. Tags already in IOB2 come back unchanged.
    """
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or tags[i - 1] == "O" or tags[i - 1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def read_conll(path, task):
    """CoNLL columns (a word per line, a blank line between sentences) -> [(words, tags)]: the word from
    column task.text[0], its tag from column task.label. Chunk tags (metric entity_f1) become IOB2."""
    sentences, words, tags, numbers = [], [], [], []
    need = columns_needed(task)
    for number, line in enumerate(read_text(path).split("\n") + [""], start=1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if words:
                tags = to_iob2(tags) if task.metric == "entity_f1" else tags
                for tag, at in zip(tags, numbers):  # checked in IOB2, the form of the task's labels
                    if task.labels is not None and tag not in task.labels:
                        raise DataError(f"{path}:{at}: unknown {task.name} tag {tag!r} "
                                        f"(expected one of {', '.join(task.labels[:12])})")
                sentences.append((words, tags))
            words, tags, numbers = [], [], []
            continue
        if len(columns) < need:
            raise DataError(f"{path}:{number}: expected {need} columns, found {len(columns)}")
        words.append(columns[task.text[0]])
        tags.append(columns[task.label])
        numbers.append(number)
    if not sentences:
        raise DataError(f"{path}: no sentences (only blank or -DOCSTART- lines)")
    return sentences
