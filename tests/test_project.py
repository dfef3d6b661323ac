"""The project's own promises: CI runs the README's test command."""

from conftest import ROOT


def code_blocks(text):
    return text.split("```")[1::2]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = code_blocks(readme)[1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
