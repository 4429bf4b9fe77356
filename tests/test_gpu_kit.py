"""The GPU validation kit (scripts/gpu_check.sh): each part's dry run end to end on the CPU, which runs start in
the time left, the shell wrapper, the wheels it carries against what the GPU machine has, and the marker that
selects the CUDA tests."""

import json
import os
import re
import stat
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))
import gpu_check  # noqa: E402

#: Requirements declared in flowsteer's dependency closure that Python 3.12 does not need, and why: diffusers
#: declares importlib-metadata without a marker but imports the standard library's importlib.metadata on any
#: Python >= 3.8 (diffusers/utils/import_utils.py); lazy-importer is importlib-metadata's own dependency.
NOT_NEEDED_ON_312 = {"importlib-metadata"}


def _names(path: Path) -> set[str]:
    return {_canonical(line.split("#", 1)[0]) for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _tested_with(path: Path, **versions) -> Path:
    """A tested_with.json as scripts/make_wheels.sh writes it, with ``versions`` over this machine's."""
    from importlib.metadata import version

    mine = {name: version(name) for name in gpu_check.TESTED_WITH}
    path.write_text(json.dumps({"date": "2026-01-01", "python": "3.12.3", "versions": {**mine, **versions}}))
    return path


def _check_runs(report: dict, part: int, table: str) -> None:
    """Every dry run of ``part`` ran in order and wrote every row, measured, with its CPU time."""
    runs = [(what, arguments) for p, what, arguments in gpu_check.DRY_RUNS if p == part]
    assert [run["what"] for run in report["speed"]] == [what for what, _ in runs]
    for (what, arguments), run in zip(runs, report["speed"]):
        assert not run.get("not_started") and not run.get("error") and run["estimated_seconds"] > 0
        rows = run["results"]["rows"]
        expected = {(b, m, s) for b in arguments["backbones"] for m in ["unguided", *arguments["methods"]]
                    for s in arguments["sizes"]}
        assert {(r["backbone"], r["method"], r["size"]) for r in rows} == expected
        assert all(r["status"] == "measured" and r["seconds_per_image"] > 0 and r["cpu_seconds_per_image"] > 0
                   for r in rows), rows
        assert f"# Speed: {what}" in table
        for r in rows:
            assert f"| {r['method']} | {r['size']} | {r['steps']} |" in table


def test_dry_run_of_part_1_runs_every_phase_and_writes_every_row(tmp_path, capsys):
    """Part 1 in miniature (in this process, so the imports are paid once): the environment with the tested-with
    versions (a torch of another major.minor is flagged), two CUDA tests on the CPU, the SD3.5 and FLUX.1 runs;
    its files go to part1/ and no joined table is written while part 2 is missing."""
    out = tmp_path / "kit"
    tested = _tested_with(tmp_path / "tested_with.json", torch="1.0.0")
    code = gpu_check.main(["--dry-run", "--part", "1", "--out", str(out), "--budget", "3600", "--tested-with",
                           str(tested)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["part1"]
    folder = out / "part1"
    assert sorted(p.name for p in folder.iterdir()) == ["environment.json", "pytest.log", "results.json", "table.md"]

    report = json.loads((folder / "results.json").read_text())
    env = report["environment"]
    assert report["format"] == "flowsteer-gpu-check/2" and report["part"] == 1 and env["dry_run"]
    assert not env["import_errors"]
    assert {"diffusers", "kornia", "lpips", "torch", "transformers"} <= set(env["versions"])
    assert json.loads((folder / "environment.json").read_text())["versions"] == env["versions"]
    assert set(env["tested_with"]["versions"]) == set(gpu_check.TESTED_WITH)
    assert env["tested_with"]["mismatches"] == {"torch": {"here": env["versions"]["torch"], "tested": "1.0.0"}}
    assert "version mismatch: torch" in stdout and "flowsteer was tested with 1.0.0" in stdout

    tests = report["tests"]
    assert tests["ok"] and tests["exit_code"] == 0 and tests["counts"]["passed"] == len(gpu_check.DRY_CUDA_TESTS)
    log = (folder / "pytest.log").read_text()
    assert all(f"{node} PASSED" in log for node in gpu_check.DRY_CUDA_TESTS), log[-2000:]

    table = (folder / "table.md").read_text()
    _check_runs(report, 1, table)
    flair = [r for r in report["speed"][0]["results"]["rows"] if r["method"] == "flair"]
    assert report["speed"][0]["results"]["settings"]["options"] == {"flair": {"data_steps": 5}} and flair
    assert "major.minor differs: torch" in table
    assert "part 1 done in" in stdout and "tests passed; all 3 runs measured" in stdout


def test_dry_run_of_part_2_runs_every_run_and_joins_the_tables(tmp_path, capsys):
    """Part 2 in miniature beside a part 1 already in --out: part 1's files stay as they were, table.md joins
    both; the editors' NFE are their loops' at 1 step, the compiled runs say so."""
    out = tmp_path / "kit"
    (out / "part1").mkdir(parents=True)
    (out / "part1" / "table.md").write_text("# flowsteer GPU check, part 1\n")
    code = gpu_check.main(["--dry-run", "--part", "2", "--out", str(out), "--budget", "3600", "--tested-with",
                           str(_tested_with(tmp_path / "tested_with.json"))])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    assert sorted(p.name for p in (out / "part2").iterdir()) == ["environment.json", "results.json", "table.md"]
    assert (out / "part1" / "table.md").read_text() == "# flowsteer GPU check, part 1\n"
    part2 = (out / "part2" / "table.md").read_text()
    assert (out / "table.md").read_text() == "# flowsteer GPU check, part 1\n\n" + part2

    report = json.loads((out / "part2" / "results.json").read_text())
    assert report["part"] == 2 and report["tests"] is None and not report["environment"]["tested_with"]["mismatches"]
    assert "version mismatch" not in stdout
    _check_runs(report, 2, part2)
    runs = {run["what"]: run["results"] for run in report["speed"]}
    edits = {(r["backbone"], r["method"]): r["nfe"] for what, results in runs.items() if "FlowEdit" in what
             for r in results["rows"]}
    assert edits == {("tiny-sd3", "unguided"): 1, ("tiny-sd3", "flowedit"): 2, ("tiny-sd3", "rf_inversion"): 2,
                     ("tiny-flux", "unguided"): 1, ("tiny-flux", "flowedit"): 2, ("tiny-flux", "rf_inversion"): 2}
    compiled = [results["backbones"] for what, results in runs.items() if what.startswith("regional compile")]
    assert len(compiled) == 2 and all("regional" in info["compile"] for backbones in compiled
                                      for info in backbones.values())
    assert f"all {sum(part == 2 for part, _, _ in gpu_check.DRY_RUNS)} runs measured" in stdout
    profiles = [run["results"]["backbones"] for run in report["speed"] if "memory profile" in run["what"]]
    assert [info["memory"] for backbones in profiles for info in backbones.values()] == ["8bit", "low"]


def test_a_run_starts_only_if_its_estimate_fits_what_is_left(monkeypatch, tmp_path, capsys):
    """Runs in order of priority: one whose estimate is above what is left does not start (and says why), the next
    does; once a run has taken less than its estimate, later estimates are rescaled by that ratio."""
    import tasks.commands.speed as speed

    estimates = {"big": 100.0, "small": 1.0, "medium": 40.0}
    started = []
    monkeypatch.setattr(speed, "estimate_speed", lambda backbones, **_: estimates[backbones[0]])
    monkeypatch.setattr(speed, "run_speed", lambda backbones, **_: started.append(backbones[0]) or {"rows": []})
    runs = [(name, dict(backbones=[name], methods=["flair"])) for name in ("big", "small", "medium")]
    report = {"speed": []}
    gpu_check.run_speed_rows(runs, tmp_path, report, lambda: None, lambda: 30.0 + gpu_check.MARGIN, 1)
    assert started == ["small", "medium"]  # medium: 40 s by the prior, far less after small took ~0 s of its 1 s
    big, small, medium = report["speed"]
    assert big["not_started"].startswith("estimated 100 s (prior 100 s x 1.00") and "30 s left" in big["not_started"]
    assert "not_started" not in small and "not_started" not in medium and medium["estimated_seconds"] == 40.0
    assert big["arguments"]["options"] == {"flair": {"data_steps": 5}} and big["arguments"]["repeats"] == 1
    assert "speed: not started: big: estimated 100 s" in capsys.readouterr().out


def test_cuda_tests_still_running_at_their_limit_are_stopped_and_logged(tmp_path):
    """pytest over the whole tests/ folder cannot even collect in the 1 s left to it: it is stopped (its process
    group), the log says so and the phase is not ok."""
    tests = gpu_check.CudaTests(tmp_path, True, gpu_check.GPU_CUDA_TESTS)
    result = tests.result(0.0)
    assert tests.process.returncode is not None and result["exit_code"] is None and not result["ok"]
    log = (tmp_path / "pytest.log").read_text()
    assert log.startswith(f"$ {sys.executable} -m pytest -m cuda") and "pytest stopped: still running after 0 s" in log


def test_tested_with_flags_a_different_major_minor_version_only(tmp_path):
    versions = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "huggingface_hub": "1.4.1", "diffusers": "0.42.1"}
    file = _tested_with(tmp_path / "tested.json", torch="2.11.3", transformers="5.25.0", diffusers="0.42.1")
    found = gpu_check.tested_with(file, {**versions, "huggingface_hub": json.loads(file.read_text())["versions"]
                                         ["huggingface-hub"]})
    assert found["mismatches"] == {"transformers": {"here": "5.17.0", "tested": "5.25.0"}}
    missing = gpu_check.tested_with(tmp_path / "absent.json", versions)
    assert "scripts/make_wheels.sh writes it" in missing["problem"] and missing["mismatches"] == {}


def test_options_that_do_nothing_or_name_no_test_are_refused(tmp_path, capsys):
    for argv, message in [
        (["--part", "2", "--cuda-tests", "tests/test_cuda.py"], "part 2 runs none"),
        (["--cuda-tests", "tests/no_such_file.py"], "tests/no_such_file.py is not in"),
        (["--budget", "0"], "--budget takes a positive number of seconds, got 0"),
        (["--part", "3"], "invalid choice: 3"),
    ]:
        with pytest.raises(SystemExit) as error:
            gpu_check.main(["--dry-run", "--out", str(tmp_path / "k"), *argv])
        assert error.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_the_shell_wrapper_installs_the_wheels_privately_and_passes_its_options(tmp_path):
    """gpu_check.sh with a stand-in interpreter that prints what it is asked: the wheels go into a private folder
    (no index, no dependencies) on PYTHONPATH, then gpu_check.py gets the tested-with file of those wheels, the
    options as given, and the install's seconds; a dry run installs nothing (the wheels are for Python 3.12)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "demo-1.0-py3-none-any.whl").write_bytes(b"")
    python = tmp_path / "python"
    python.write_text('#!/usr/bin/env bash\necho "CALL $* | PYTHONPATH=$PYTHONPATH '
                      'INSTALL=${GPU_CHECK_INSTALL_SECONDS:-none} OFFLINE=$HF_HUB_OFFLINE"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--wheels", str(wheels), "--part", "2", "--out",
                           "/tmp/x"], env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    install, run = [line for line in done.stdout.splitlines() if line.startswith("CALL ")]
    assert "-m pip install" in install and "--no-index --no-deps" in install
    site = re.search(r"--target (\S+)", install)[1]
    assert install.split(" | ")[0].endswith(str(wheels / "demo-1.0-py3-none-any.whl"))
    assert run.startswith(f"CALL {SCRIPTS / 'gpu_check.py'} --tested-with {wheels / 'tested_with.json'} --part 2 "
                          f"--out /tmp/x | PYTHONPATH={REPO}:{site}")
    assert re.search(r"INSTALL=\d+\.\d OFFLINE=1$", run), run
    assert "installing 1 carried wheels" in done.stdout
    dry = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--wheels", str(wheels), "--dry-run", "--out", "k"],
                         env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=60)
    (run,) = [line for line in dry.stdout.splitlines() if line.startswith("CALL ")]  # no install: 3.12 wheels
    assert "--dry-run --out k" in run and "dry run: using the packages this Python already has" in dry.stdout


def test_the_gpu_runs_are_the_dry_runs_at_full_size():
    """What the GPU runs measure, part by part. Part 1: SD3.5-medium and FLUX.1-dev at 512, 768 and 1024 pixels
    and 28 steps, every method (FLUX.1-dev's 1024 first). Part 2: today's models (FLUX.2 klein, Qwen-Image) at 1024,
    FlowDPS on SD3.5-medium, OT-ODE and Flower on the pixel-space network of their papers, the editors FlowEdit and
    RF-Inversion on sd3.5-medium and flux-dev at 1024, the memory profiles 8bit (FLUX.1-dev) and low (SD3.5-medium)
    at 1024, then the regional compile of the watched pair. The dry run has
    each run in miniature: the same part, methods and switches, each backbone's tiny counterpart."""
    from tasks.commands.speed import BACKBONES, FULL_SIZE

    def cells(part: int) -> set:
        return {(b, m, s, n, a.get("compile", a.get("memory", "off"))) for p, _, a in gpu_check.GPU_RUNS if p == part
                for b in a["backbones"] for m in a["methods"] for s in a["sizes"] for n in a["steps"]}

    methods = list(gpu_check.METHODS)
    assert set(methods) == {"flowchef-latent", "flowchef-pixel", "flair", "pnp_flow", "dps"}
    assert cells(1) == {(b, m, s, 28, "off") for b in ("sd3.5-medium", "flux-dev") for m in methods
                        for s in (512, 768, 1024)}
    assert [a["sizes"] for p, _, a in gpu_check.GPU_RUNS if p == 1] == [[512, 768, 1024], [1024], [512, 768]]
    assert cells(2) == (
        {(b, m, 1024, 28, "off") for b in ("flux2-klein-4b", "qwen-image") for m in ("flowchef-latent", "flair")}
        | {("sd3.5-medium", "flowdps", s, 28, "off") for s in (768, 1024)}
        | {("pnp-flow-unet", m, s, 100, "off") for m in ("ot_ode", "flower") for s in (128, 256)}
        | {(b, m, 1024, 28, "off") for b in ("sd3.5-medium", "flux-dev") for m in ("flowedit", "rf_inversion")}
        | {(b, "flowchef-latent", 1024, 28, "regional") for b in ("sd3.5-medium", "flux-dev")}
        | {("flux-dev", "flowchef-latent", 1024, 28, "8bit"), ("sd3.5-medium", "flowchef-latent", 1024, 28, "low")})
    assert [a["backbones"][0] for p, _, a in gpu_check.GPU_RUNS if p == 2][:2] == ["flux2-klein-4b", "qwen-image"]
    assert gpu_check.GPU_RUNS[-1][2].get("compile") == "regional"  # the compiled pair comes last
    assert gpu_check.OPTIONS == {"flair": {"data_steps": 5}}

    tiny = {"sd3.5-medium": "tiny-sd3", "flux-dev": "tiny-flux", "flux2-klein-4b": "tiny-flux2-klein",
            "qwen-image": "tiny-qwen-image", "pnp-flow-unet": "tiny-pixel"}
    assert [(p, what) for p, what, _ in gpu_check.GPU_RUNS] == [(p, what) for p, what, _ in gpu_check.DRY_RUNS]
    for (_, _, gpu), (_, _, dry) in zip(gpu_check.GPU_RUNS, gpu_check.DRY_RUNS):
        assert gpu["methods"] == dry["methods"] and gpu.get("compile") == dry.get("compile")
        assert set(gpu["backbones"]) <= set(FULL_SIZE) | {"pnp-flow-unet"}  # names the speed table knows
        assert dry["backbones"] == [tiny[b] for b in gpu["backbones"]] and set(dry["backbones"]) <= set(BACKBONES)
        assert len(dry["sizes"]) == 1 and max(dry["steps"]) <= 2 and "compile_backend" not in gpu


def test_every_gpu_run_can_start_in_its_part_by_the_speed_estimates():
    """By the speed command's own estimates (H100), no run is too long to ever start in a part of its own, and
    part 1's first run fits beside a minute of CUDA tests."""
    from tasks.commands.speed import estimate_speed

    estimates = {what: estimate_speed(**a, repeats=1, isolate=False, device="cuda",
                                      options={r: v for r, v in gpu_check.OPTIONS.items() if r in a["methods"]})
                 for _, what, a in gpu_check.GPU_RUNS}
    assert all(0 < seconds < gpu_check.BUDGET - gpu_check.MARGIN for seconds in estimates.values()), estimates
    assert 60 + estimates[gpu_check.GPU_RUNS[0][1]] < gpu_check.BUDGET - gpu_check.MARGIN


def _uncovered(device: set[str], wheels: set[str], not_needed: set[str]) -> tuple[list[str], set[str]]:
    """(flowsteer's run-time and test dependencies, and theirs for each carried wheel (markers evaluated for the
    GPU machine's Python 3.12 on Linux), that are neither on the GPU machine nor carried nor ``not_needed``; the
    ``not_needed`` names the walk met). What the machine has brings its own dependencies there, so the walk stops
    at it."""
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "sys_platform": "linux", "platform_system": "Linux", "implementation_name": "cpython"}
    seen, missing, skipped, todo = set(), set(), set(), [("flowsteer", ("test",))]
    while todo:
        name, extras = todo.pop()
        try:
            requirements = distribution(name).requires or []
        except PackageNotFoundError:
            pytest.fail(f"{name} is a dependency but is not installed here")
        for line in requirements:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({**environment, "extra": e}) for e in extras or ("",)):
                continue
            canonical = _canonical(requirement.name)
            if canonical in seen:
                continue
            seen.add(canonical)
            if canonical in not_needed:
                skipped.add(canonical)
            elif canonical in wheels:
                todo.append((requirement.name, ()))
            elif canonical not in device:
                missing.add(canonical)
    return sorted(missing), skipped


def test_the_carried_wheels_cover_what_the_gpu_machine_lacks():
    device = _names(SCRIPTS / "device_packages.txt")
    wheels = _names(SCRIPTS / "wheels.txt")
    assert {"torch", "transformers", "accelerate", "safetensors", "pytest", "scikit-image"} <= device
    missing, skipped = _uncovered(device, wheels, NOT_NEEDED_ON_312)
    assert not missing, f"neither on the GPU machine nor in scripts/wheels.txt: {missing}"
    assert skipped == NOT_NEEDED_ON_312  # each name the list leaves out is declared in the closure (none stale)
    assert not wheels & device, "scripts/wheels.txt carries what the GPU machine already has"
    assert not wheels & NOT_NEEDED_ON_312, "scripts/wheels.txt carries what Python 3.12 does not need"
    for name in wheels:  # make_wheels.sh downloads the version installed here
        distribution(name)
    assert {"diffusers", "kornia", "kornia-rs", "lpips"} <= wheels
    assert _uncovered(device, wheels - {"lpips"}, NOT_NEEDED_ON_312)[0] == ["lpips"]  # the walk sees a missing wheel
    assert _uncovered(device, wheels, set())[0] == ["importlib-metadata"]  # what the list is needed for


@pytest.mark.slow
def test_cuda_tests_are_exactly_those_marked_and_none_skips_on_its_own():
    """What part 1 runs on the GPU (`pytest -m cuda tests`): the CUDA tests and nothing else."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", *gpu_check.GPU_CUDA_TESTS], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    selected = [line for line in done.stdout.splitlines() if line.startswith("tests/") and "::" in line]
    assert any(line.startswith("tests/test_operators_generic.py::test_cuda_matches_cpu") for line in selected)
    assert sum(line.startswith("tests/test_cuda.py::") for line in selected) >= 20
    assert all(line.startswith("tests/test_cuda.py::") or "::test_cuda_" in line for line in selected), selected
    assert set(gpu_check.DRY_CUDA_TESTS) <= set(selected)
    for path in (REPO / "tests").glob("test_*.py"):  # a GPU test takes the fixture, which marks it
        if path.name != Path(__file__).name:
            assert "cuda.is_available()" not in path.read_text(), f"{path.name} checks for CUDA itself: use cuda_device"
