"""The README's examples run as written: CI runs its Quick start, every ```python block runs (section by section,
one namespace per section, from a folder laid out as the repository root) and every `flowsteer` line of its
```bash blocks parses."""

import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest -q'
    assert command in readme
    assert command in ci.splitlines()
    assert "python3 -m venv" in ci and "mktemp -d" in ci


def sections() -> dict[str, str]:
    """The README's "## " sections (their "### " subsections included) by title."""
    parts = README.read_text().split("\n## ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in parts}


def blocks(text: str, language: str) -> list[str]:
    """The ```language blocks of ``text``, in order."""
    return [block.split("```", 1)[0] for block in text.split(f"```{language}\n")[1:]]


def api_snippets(title: str = "Python API: diffusers' conventions") -> list[str]:
    """The Python blocks of the README's section ``title``, in order."""
    return blocks(sections()[title], "python")


def run_section(title: str, tmp_path: Path, monkeypatch) -> dict:
    """Run the Python blocks of section ``title`` in one namespace, from ``tmp_path`` with demos/ linked in."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "demos").symlink_to(ROOT / "demos")
    monkeypatch.chdir(tmp_path)
    snippets = api_snippets(title)
    assert snippets, f"the README has no Python block in {title!r}"
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    return namespace


def check_operators(namespace: dict, tmp_path: Path) -> None:
    from operators import make_operator

    y, x_init = namespace["y"], namespace["x_init"]  # the first block's (the deepinv block reuses the name op)
    residual = make_operator("sr:factor=4")(x_init) - y
    assert x_init.shape == (1, 3, 256, 256) and residual.pow(2).mean().sqrt() < 0.05  # A⁺ y fits y to its noise
    assert callable(namespace["solver"]) and namespace["physics"] is not None


def check_flow_models(namespace: dict, tmp_path: Path) -> None:
    assert namespace["result"].image.shape == (1, 3, 64, 64)


def check_guidance_methods(namespace: dict, tmp_path: Path) -> None:
    result = namespace["result"]  # the particle search's
    assert result.image.shape == (1, 3, 64, 64) and result.nfe == 4 * 8 and len(result.info["ess"]) > 0


def check_commands(namespace: dict, tmp_path: Path) -> None:
    assert (tmp_path / "restored.png").is_file()


def check_straight_through(namespace: dict, tmp_path: Path) -> None:
    assert namespace["flow"] is not None and namespace["result"].image.shape == (1, 3, 64, 64)


SECTIONS = {
    "Forward operators": check_operators,
    "Flow models and sampling": check_flow_models,
    "Guidance methods": check_guidance_methods,
    "Commands": check_commands,
    "Straight-through guidance: sequences and hard inputs": check_straight_through,
}
RUN_BELOW = ("Editing real images", "Python API: diffusers' conventions")


def test_every_python_block_of_the_readme_is_run_here():
    with_python = [title for title, text in sections().items() if blocks(text, "python")]
    assert sorted(with_python) == sorted([*SECTIONS, *RUN_BELOW])
    assert sum(len(blocks(text, "python")) for text in sections().values()) == README.read_text().count("```python")


@pytest.mark.filterwarnings("ignore:no calibrated regularization weights")
@pytest.mark.parametrize("title", list(SECTIONS))
def test_the_python_blocks_of_each_section_run_as_written(title, tmp_path, monkeypatch):
    SECTIONS[title](run_section(title, tmp_path, monkeypatch), tmp_path)


def test_the_editing_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    """The Python blocks of "Editing real images", in one namespace, from a copy of the root's layout."""
    assert len(api_snippets("Editing real images")) == 2
    run_section("Editing real images", tmp_path, monkeypatch)
    assert (tmp_path / "edited.png").is_file()
    assert capsys.readouterr().out.split() == ["40", "(64,", "64)", "8", "(32,", "32)"]


def test_the_python_api_snippets_run_as_written(tmp_path, monkeypatch):
    """Run in one namespace from a copy of the repository root's layout (demos/ linked), writing into tmp."""
    import os

    assert len(api_snippets()) >= 4
    run_section("Python API: diffusers' conventions", tmp_path, monkeypatch)
    assert sorted(os.listdir(tmp_path / "out")) == ["flipped.png", "hubble.png", "restored-0.png",
                                                    "restored-1.png", "restored_grid.png"]


def command_lines() -> list[str]:
    """Every `flowsteer ...` command of the README's bash blocks, continuation lines joined."""
    lines = []
    for block in blocks(README.read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("flowsteer "):
                lines.append(line)
    return lines


def test_every_flowsteer_line_of_the_readme_parses_and_generate_lines_write_apart():
    from tasks.commands.cli import build_parser

    parser = build_parser()
    outs = []
    lines = command_lines()
    assert len(lines) > 30
    for line in lines:
        words = shlex.split(line, comments=True)
        try:
            args = parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"the README's command does not parse: {line}")
        if words[1] == "generate":
            outs.append(args.out)
    assert len(outs) >= 6 and len(set(outs)) == len(outs), outs  # each example its own --out
