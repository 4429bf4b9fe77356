"""The package layout: importing the packages loads no training or benchmark code, and the README's Layout section
names exactly the folders there are."""

import fnmatch
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Modules that train or benchmark; ``import guidance, operators, tasks`` must load none of them.
HEAVY = ("train_default", "speed", "random_backbones", "benchmark", "evaluate_default", "analytic_benchmark",
         "sequence_benchmark")


def test_importing_the_packages_loads_no_training_or_benchmark_module():
    code = ("import sys, guidance, operators, tasks; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('guidance', 'operators', 'tasks')))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "guidance.loading.models" in loaded and "operators.registry" in loaded  # the check sees the imports
    heavy = [name for name in loaded if any(part in HEAVY for part in name.split("."))]
    assert not heavy, f"import guidance, operators, tasks loads {heavy}"
    assert not [name for name in loaded if name.startswith("guidance.backbones.") and name.rpartition(".")[2] in
                ("sd3", "flux", "generic", "pipeline")], "the backbone adapters load on first use only"


def _ignored() -> list[str]:
    lines = (ROOT / ".gitignore").read_text().splitlines() if (ROOT / ".gitignore").is_file() else []
    return [line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#")]


def _folders(parent: Path) -> set[str]:
    """The folders of ``parent`` that belong to the project: not hidden, not ignored (venv/, build/, caches)."""
    ignored = _ignored()
    return {path.name for path in parent.iterdir() if path.is_dir() and not path.name.startswith(".")
            and not any(fnmatch.fnmatch(path.name, pattern) for pattern in ignored)}


def _layout() -> tuple[set[str], set[str]]:
    """(the top-level folders, the folders under guidance/) that the README's Layout block lists."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout\n", 1)[1].split("```", 2)[1]
    top, sub, parent = set(), set(), None
    for line in block.splitlines():
        if match := re.match(r"([\w.-]+)/\s", line):
            parent = match.group(1)
            top.add(parent)
        elif (match := re.match(r"  ([\w.-]+)/\s", line)) and parent == "guidance":
            sub.add(match.group(1))
    return top, sub


def test_the_readme_layout_lists_exactly_the_folders():
    top, sub = _layout()
    assert top == _folders(ROOT), "README.md's Layout section and the top-level folders differ"
    assert sub == _folders(ROOT / "guidance"), "README.md's Layout section and the folders of guidance/ differ"
    assert {"backbones", "analytic", "sequences"} <= sub


def test_the_backbone_registry_names_classes_that_exist():
    """Every family's adapter is a FlowModel and its diffusers classes exist; `flowsteer models` lists its rows."""
    from guidance import FlowModel
    from guidance.backbones.registry import BACKBONES, known_models
    from tasks.cli_listing import KNOWN_MODELS

    assert len({b.name for b in BACKBONES}) == len(BACKBONES)
    import guidance

    for backbone in BACKBONES:
        assert issubclass(backbone.adapter_class(), FlowModel)
        assert getattr(guidance, backbone.adapter_class().__name__) is backbone.adapter_class()  # guidance.SanaModel
        for name in backbone.pipelines:
            assert backbone.pipeline_class(name).__name__ == name
            assert backbone.transformer_class().__name__ == backbone.transformer
    assert KNOWN_MODELS == known_models() and KNOWN_MODELS[0][0] == "default"
