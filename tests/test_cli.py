"""The flowsteer command line."""

import json
import shutil
import subprocess

import pytest

from operators import list_operators
from tasks.commands.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("flowsteer ")


def test_operators_lists_every_operator_with_parameters(capsys):
    assert main(["operators"]) == 0
    out = capsys.readouterr().out
    names = [entry.name for entry in list_operators()]
    assert len(names) >= 10
    for name in names:
        assert f"\n{name}  (" in "\n" + out
    assert "kernel_size=61" in out and "factor=4" in out and "quality=50" in out


def test_operators_json(capsys):
    assert main(["operators", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    assert by_name["gaussian_blur"]["parameters"]["sigma"] == "3.0"
    assert by_name["inpaint_mask"]["parameters"]["path"] == "None"  # a path, or the name of a shipped mask
    assert by_name["function"]["parameters"]["fn"] == "required"
    assert by_name["jpeg"]["linear"] == "no" and by_name["sr"]["linear"] == "yes"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "operators" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("flowsteer") is None, reason="console script not installed")
def test_console_script_is_installed():
    result = subprocess.run(["flowsteer", "operators"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "gaussian_blur" in result.stdout
