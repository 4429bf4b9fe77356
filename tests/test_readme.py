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


def api_snippets(title: str = "Python API: diffusers' conventions") -> list[str]:
    """The Python blocks of the README's section ``title``, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_the_editing_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    """The Python blocks of "Editing real images", in one namespace, from a copy of the root's layout."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "demos").symlink_to(ROOT / "demos")
    monkeypatch.chdir(tmp_path)
    snippets = api_snippets("Editing real images")
    assert len(snippets) == 2
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "edited.png").is_file()
    assert capsys.readouterr().out.split() == ["40", "(64,", "64)", "8", "(32,", "32)"]


def test_the_python_api_snippets_run_as_written(tmp_path, monkeypatch):
    """Run in one namespace from a copy of the repository root's layout (demos/ linked), writing into tmp."""
    import os

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "demos").symlink_to(ROOT / "demos")
    monkeypatch.chdir(tmp_path)
    snippets = api_snippets()
    assert len(snippets) >= 4
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert sorted(os.listdir(tmp_path / "out")) == ["flipped.png", "hubble.png", "restored-0.png",
                                                    "restored-1.png", "restored_grid.png"]
