"""The README's Quick start is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest -q'
    assert command in readme
    assert command in ci.splitlines()
    assert "python3 -m venv" in ci and "mktemp -d" in ci
