"""The task table: a task is a row of data, not code.

A Task says what a task is (its name, its level, its labels, its metric) and
how its files are read. Everything else asks a task's level or metric, never
its name: model.py builds one head per task from its level and label count,
data.py reads and tokenizes its files, train.py scores it with its metric.

    level   "sentence": one label per text (read from the pooled sentence vector)
            "word":     one tag per word (read from each word's first piece)
    metric  "accuracy":       share of texts labelled right (sentence level)
            "entity_f1":      F1 of IOB2 chunks, conlleval's rules (word level, tags like B-PER)
            "token_accuracy": share of words tagged right (word level, tags like NNP)

TASKS holds the built-in rows (`train.py --tasks ag,ner,pos`); a researcher's
own tasks come from a JSON file of the same fields (task_files.py,
docs/own-task.md).
"""

from dataclasses import asdict, dataclass, field

AG_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # AG News's classes.txt; the CSV spells them 1-4
NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
# CoNLL-2003's POS tags (the Penn Treebank's, and "NN|SYM", which its files use once), and its chunk
# types in IOB2: every tag its files hold, so that a split never meets a tag its head lacks.
POS_TAGS = ('"', "$", "''", "(", ")", ",", ".", ":", "CC", "CD", "DT", "EX", "FW", "IN", "JJ", "JJR", "JJS",
            "LS", "MD", "NN", "NNP", "NNPS", "NNS", "NN|SYM", "PDT", "POS", "PRP", "PRP$", "RB", "RBR", "RBS",
            "RP", "SYM", "TO", "UH", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "WDT", "WP", "WP$", "WRB")
CHUNK_TAGS = ("O", *(f"{p}-{kind}" for kind in ("ADJP", "ADVP", "CONJP", "INTJ", "LST", "NP", "PP", "PRT", "SBAR",
                                                "UCP", "VP") for p in "BI"))
LEVELS = {"sentence": ("accuracy",), "word": ("entity_f1", "token_accuracy")}  # level -> its metrics


@dataclass(frozen=True)
class Task:
    """One task. The first five fields describe it; a run folder keeps them (card), a model is built from them."""
    name: str  # names its head ("ner_head"), its loss column and its scores ("ner_f1")
    level: str  # "sentence" or "word"
    metric: str  # "accuracy", "entity_f1" or "token_accuracy"
    labels: tuple = None  # label names, in id order; None: the labels of its train file, sorted
    output: str = None  # its key in predict.py's output (default: the name)
    # How its files are read (data.read_examples):
    files: dict = field(default_factory=dict)  # split -> path; without "valid", train's rows are held out
    format: str = "conll"  # "csv", "tsv" (sentence level) or "conll" (word level: a word per line)
    text: tuple = (0,)  # csv/tsv: the columns joined by a space into the text; conll: the word's column
    label: int = -1  # the label's (csv/tsv) or the tag's (conll) column; negative counts from the end
    codes: tuple = None  # how the file spells each label, where not by its name (AG News: "1" to "4")
    header: bool = False  # csv/tsv: the first row names the columns
    clean: bool = False  # undo AG News's HTML damage (data.clean_ag_text)
    valid_fraction: float = 0.05  # without a "valid" file: the share of train held out (train.py --valid-fraction)

    @property
    def key(self):
        """predict.py's key for this task's output."""
        return self.output or self.name

    def card(self):
        """What a run folder keeps of the task (config.json): enough to build its head and read its output."""
        return {"name": self.name, "level": self.level, "metric": self.metric, "labels": list(self.labels),
                "output": self.output}

    def reading(self):
        """Everything that shapes how a file of this task is read into examples (the data cache's key)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "files", "output", "valid_fraction")}


_CONLL = {split: f"conll2003/{split}.txt" for split in ("train", "valid", "test")}  # word POS chunk NER

TASKS = {  # the built-in tasks, on the files download.py fetches into --data
    "ag": Task("ag", "sentence", "accuracy", AG_CLASSES, "topic", {"train": "ag_news/train.csv",
               "test": "ag_news/test.csv"}, "csv", text=(1, 2), label=0, codes=("1", "2", "3", "4"), clean=True),
    "ner": Task("ner", "word", "entity_f1", NER_TAGS, "entities", _CONLL, label=-1),
    "pos": Task("pos", "word", "token_accuracy", POS_TAGS, "pos_tags", _CONLL, label=1),
    "chunk": Task("chunk", "word", "entity_f1", CHUNK_TAGS, "chunks", _CONLL, label=2),
}
SEED_TASKS = ("ag", "ner")  # train.py's default --tasks
