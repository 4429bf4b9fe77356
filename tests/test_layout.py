"""The package layout: importing the packages loads no training or benchmark code, and the README's Layout section
names exactly the folders there are."""

import fnmatch
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

#: Rooms of tasks/ that hold commands, studies, model builders or training; ``import guidance, operators, tasks``
#: must load none of their modules (the commands are functions of ``tasks`` imported on first use).
HEAVY = ("tasks.commands", "tasks.studies", "tasks.random_models", "tasks.default_model")


def test_importing_the_packages_loads_no_training_or_benchmark_module():
    code = ("import sys, guidance, operators, tasks; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('guidance', 'operators', 'tasks')))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "guidance.loading.models" in loaded and "operators.registry" in loaded  # the check sees the imports
    heavy = [name for name in loaded if any(name == room or name.startswith(room + ".") for room in HEAVY)]
    assert not heavy, f"import guidance, operators, tasks loads {heavy}"
    assert not [name for name in loaded if name.startswith("guidance.backbones.") and name.rpartition(".")[2] in
                ("sd3", "flux", "generic", "pipeline")], "the backbone adapters load on first use only"


def _tracked(parent: Path) -> set[str] | None:
    """The folders of ``parent`` that hold files git tracks; None outside a git checkout."""
    try:
        done = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=parent, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return {name.split("/", 1)[0] for name in done.stdout.split("\0") if "/" in name}


def _ignored() -> list[str]:
    lines = (ROOT / ".gitignore").read_text().splitlines() if (ROOT / ".gitignore").is_file() else []
    return [line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#")]


def _tracked_folders() -> set[str] | None:
    """Every folder (a relative path, "/"-separated) that holds a file git tracks; None outside a git checkout."""
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:  # no git
        return None
    if done.returncode != 0 or not done.stdout:
        return None
    folders = set()
    for name in done.stdout.split("\0"):
        parts = name.split("/")[:-1]
        folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return folders


def _folders(parent: str, tracked: set[str] | None) -> set[str]:
    """The folders of ``parent`` ("" for the top) that belong to the project: those git tracks files in (an ``out/``
    folder a user made does not count); outside a git checkout, those on disk that are not hidden or ignored."""
    if tracked is not None:
        prefix = f"{parent}/" if parent else ""
        return {path[len(prefix):] for path in tracked if path.startswith(prefix) and "/" not in path[len(prefix):]
                and not path[len(prefix):].startswith(".")}
    ignored = [*_ignored(), "__pycache__"]
    return {path.name for path in (ROOT / parent).iterdir() if path.is_dir() and not path.name.startswith(".")
            and not any(fnmatch.fnmatch(path.name, pattern) for pattern in ignored)}


def _layout() -> dict[str, set[str]]:
    """The folder tree of the README's Layout block (two spaces of indent per level): folder path -> the
    subfolders it lists ("" for the top level)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout\n", 1)[1].split("```", 2)[1]
    tree: dict[str, set[str]] = {"": set()}
    stack: list[str] = []
    for line in block.splitlines():
        if match := re.match(r"((?:  )*)([\w.-]+)/(?:\s|$)", line):
            depth = len(match.group(1)) // 2
            if depth > len(stack):
                continue  # deeper than a listed parent: not a folder line
            stack[depth:] = [match.group(2)]
            parent, path = "/".join(stack[:-1]), "/".join(stack)
            tree.setdefault(parent, set()).add(match.group(2))
            tree.setdefault(path, set())
    return tree


def test_the_readme_layout_lists_exactly_the_folders():
    """The top level, guidance/ and tasks/ (and any folder whose subfolders the README lists) have exactly the
    folders the README's Layout section names, counting folders that hold tracked files only."""
    tree, tracked = _layout(), _tracked_folders()
    for parent, listed in tree.items():
        if parent in ("", "guidance", "tasks") or listed:
            assert listed == _folders(parent, tracked), \
                f"README.md's Layout section and the folders of {parent or 'the top level'}/ differ"
    assert {"backbones", "methods", "analytic", "sequences", "loading"} <= tree["guidance"]
    assert {"commands", "outputs", "studies", "random_models", "default_model"} <= tree["tasks"]


def test_a_folder_git_does_not_track_does_not_count():
    """An ``out/`` folder a user made (untracked) is not a project folder; a tracked one is."""
    assert "out" not in _folders("", {"guidance", "guidance/methods", "tasks"})
    assert _folders("guidance", {"guidance", "guidance/methods", "guidance/methods/x", "tasks"}) == {"methods"}


def test_the_backbone_registry_names_classes_that_exist():
    """Every family's adapter is a FlowModel and its diffusers classes exist; `flowsteer models` lists its rows."""
    from guidance import FlowModel
    from guidance.backbones.registry import BACKBONES, known_models
    from tasks.commands.listings import KNOWN_MODELS

    assert len({b.name for b in BACKBONES}) == len(BACKBONES)
    import guidance

    for backbone in BACKBONES:
        assert issubclass(backbone.adapter_class(), FlowModel)
        assert getattr(guidance, backbone.adapter_class().__name__) is backbone.adapter_class()  # guidance.SanaModel
        for name in backbone.pipelines:
            assert backbone.pipeline_class(name).__name__ == name
            assert backbone.transformer_class().__name__ == backbone.transformer
    assert KNOWN_MODELS == known_models() and KNOWN_MODELS[0][0] == "default"
