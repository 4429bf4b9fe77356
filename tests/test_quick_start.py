"""A newcomer's first two commands, in order, in a fresh checkout: the README's quick start (which writes out/ inside
the repository) and then the test command, whose layout check must not count the folder the quick start wrote."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_command() -> str:
    """The ``flowsteer restore ...`` part of the README's quick start line (after its ``pip install -e . &&``)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    (line,) = [line for line in block.splitlines() if "flowsteer restore" in line]
    install, _, command = line.partition(" && ")
    assert install == "pip install -e ."
    return command


@pytest.fixture()
def fresh_checkout(tmp_path):
    """The repository's tracked files (as they are in the working tree) in a new git checkout of their own."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    checkout = tmp_path / "flowsteer"
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    for folder in ("operators", "guidance", "tasks", "tests"):  # files added but not yet committed
        for source in (ROOT / folder).rglob("*.py"):
            target = checkout / source.relative_to(ROOT)
            if "__pycache__" not in source.parts and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    subprocess.run(["git", "add", "-A"], cwd=checkout, check=True)
    return checkout


def test_the_quick_start_then_the_test_command_pass_in_a_row(fresh_checkout):
    """The README's command as written, with ``--steps 2 --quiet`` added (the same folder and files, in seconds
    instead of its 46 s), run in the checkout; then the layout check of the test command there."""
    command = quick_start_command()
    assert command.startswith("flowsteer restore ") and command.endswith("--out out/")
    flowsteer = Path(sys.executable).with_name("flowsteer")
    program = [str(flowsteer)] if flowsteer.is_file() else [sys.executable, "-m", "tasks.commands.cli"]
    done = subprocess.run(program + command.split()[1:] + ["--steps", "2", "--quiet"], cwd=fresh_checkout,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (fresh_checkout / "out").iterdir()) == ["grid.png", "measurement.png",
                                                                          "metrics.json", "restored.png"]
    # the test command's layout check, in the checkout that now holds out/
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layout.py"],
                           cwd=fresh_checkout, capture_output=True, text=True, timeout=600)
    assert tests.returncode == 0, tests.stdout[-3000:]
