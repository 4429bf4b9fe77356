"""The GPU validation kit (scripts/gpu_check.sh): its dry run end to end on the CPU, the wheels it carries against
what the GPU machine has, and the marker that selects the CUDA tests."""

import json
import os
import re
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


def _names(path: Path) -> set[str]:
    return {_canonical(line.split("#", 1)[0]) for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(completed process, out folder) of one dry run of the kit, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("kit")
    out = tmp_path / "kit"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run", "--wheels", str(tmp_path / "none"),
                           "--out", str(out), "--budget", "400"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    return done, out


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_every_row(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["environment.json", "pytest.log", "results.json", "table.md"]

    report = json.loads((out / "results.json").read_text())
    env = report["environment"]
    assert report["format"] == "flowsteer-gpu-check/1" and env["dry_run"] and not env["import_errors"]
    assert {"diffusers", "kornia", "lpips", "torch", "transformers"} <= set(env["versions"])
    assert json.loads((out / "environment.json").read_text())["versions"] == env["versions"]

    tests = report["tests"]
    assert tests["ok"] and tests["exit_code"] == 0 and not tests.get("failed")
    assert tests["counts"]["passed"] >= 30  # every operator and method on the device, and the rest
    assert "passed" in (out / "pytest.log").read_text()

    table = (out / "table.md").read_text()
    assert len(report["speed"]) == len(gpu_check.DRY_RUNS)
    for (what, arguments), run in zip(gpu_check.DRY_RUNS, report["speed"]):
        rows = run["results"]["rows"]
        expected = {(b, m, s) for b in arguments["backbones"] for m in ["unguided", *arguments["methods"]]
                    for s in arguments["sizes"]}
        assert {(r["backbone"], r["method"], r["size"]) for r in rows} == expected
        assert all(r["status"] == "measured" and r["seconds_per_image"] > 0 for r in rows), rows
        assert f"# Speed: {what}" in table
        for r in rows:
            assert f"| {r['method']} | {r['size']} | {r['steps']} |" in table
    flair = [r for r in report["speed"][0]["results"]["rows"] if r["method"] == "flair"]
    assert report["speed"][0]["results"]["settings"]["options"] == {"flair": {"data_steps": 5}} and flair
    compiled = report["speed"][2]["results"]["backbones"]
    assert all("regional" in info["compile"] for info in compiled.values())
    edits = {(r["backbone"], r["method"]): r["nfe"] for r in report["speed"][5]["results"]["rows"]}
    assert edits == {("tiny-sd3", "unguided"): 2, ("tiny-sd3", "flowedit"): 2, ("tiny-sd3", "rf_inversion"): 4,
                     ("tiny-flux", "unguided"): 2, ("tiny-flux", "flowedit"): 4, ("tiny-flux", "rf_inversion"): 4}
    assert "all measured, tests passed" in done.stdout


def test_the_gpu_runs_are_the_dry_runs_at_full_size():
    """What the GPU run measures: the full-size backbones at 512, 768 and 1024 pixels and 28 steps, every method,
    today's models (FLUX.2 klein, Qwen-Image) at 1024, then the regional compile of the watched pair at 1024; the
    dry run has the same methods and switches. Then the flow solvers at full size: FlowDPS on SD3.5-medium, OT-ODE and
    Flower on the pixel-space network of their papers; last the editors FlowEdit and RF-Inversion on the backbones
    the speed table names sd3.5-medium and flux-dev, at 1024 and 28 steps (the tiny ones at 32 and 2 in the dry
    run)."""
    full, today, compiled, flowdps, pixel, edits = (run[1] for run in gpu_check.GPU_RUNS)
    assert flowdps == dict(backbones=["sd3.5-medium"], methods=["flowdps"], sizes=[768, 1024], steps=[28])
    assert edits == dict(backbones=["sd3.5-medium", "flux-dev"], methods=["flowedit", "rf_inversion"], sizes=[1024],
                         steps=[28])
    assert gpu_check.DRY_RUNS[-1][1] == dict(backbones=["tiny-sd3", "tiny-flux"], methods=edits["methods"],
                                             sizes=[32], steps=[2])
    assert pixel == dict(backbones=["pnp-flow-unet"], methods=["ot_ode", "flower"], sizes=[128, 256], steps=[100])
    assert today["backbones"] == ["flux2-klein-4b", "qwen-image"] and today["sizes"] == [1024]
    assert full["backbones"] == ["sd3.5-medium", "flux-dev"] and full["sizes"] == [512, 768, 1024]
    assert full["steps"] == [28] and set(full["methods"]) == {"flowchef-latent", "flowchef-pixel", "flair",
                                                               "pnp_flow", "dps"}
    assert compiled["compile"] == "regional" and compiled["sizes"] == [1024] and "compile" not in full
    assert gpu_check.OPTIONS == {"flair": {"data_steps": 5}}
    from tasks.commands.speed import BACKBONES, FULL_SIZE

    assert len(gpu_check.GPU_RUNS) == len(gpu_check.DRY_RUNS)
    for (_, gpu), (_, dry) in zip(gpu_check.GPU_RUNS, gpu_check.DRY_RUNS):
        assert gpu["methods"] == dry["methods"] and gpu.get("compile") == dry.get("compile")
        assert set(gpu["backbones"]) <= set(FULL_SIZE) | {"pnp-flow-unet"}  # names the speed table knows
        assert set(dry["backbones"]) <= set(BACKBONES) - set(FULL_SIZE)


def _uncovered(device: set[str], wheels: set[str]) -> list[str]:
    """flowsteer's run-time and test dependencies, and theirs for each carried wheel (markers evaluated for the GPU
    machine's Python 3.12 on Linux), that are neither on the GPU machine nor carried. What the machine has brings
    its own dependencies there, so the walk stops at it."""
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "sys_platform": "linux", "platform_system": "Linux", "implementation_name": "cpython"}
    seen, missing, todo = set(), set(), [("flowsteer", ("test",))]
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
            if canonical in wheels:
                todo.append((requirement.name, ()))
            elif canonical not in device:
                missing.add(canonical)
    return sorted(missing)


def test_the_carried_wheels_cover_what_the_gpu_machine_lacks():
    device = _names(SCRIPTS / "device_packages.txt")
    wheels = _names(SCRIPTS / "wheels.txt")
    assert {"torch", "transformers", "accelerate", "safetensors", "pytest", "scikit-image"} <= device
    missing = _uncovered(device, wheels)
    assert not missing, f"neither on the GPU machine nor in scripts/wheels.txt: {missing}"
    assert not wheels & device, "scripts/wheels.txt carries what the GPU machine already has"
    for name in wheels:  # make_wheels.sh downloads the version installed here
        distribution(name)
    assert {"diffusers", "kornia", "kornia-rs", "lpips"} <= wheels
    assert _uncovered(device, wheels - {"lpips"}) == ["lpips"]  # the walk does see a missing wheel


@pytest.mark.slow
def test_cuda_tests_are_exactly_those_marked_and_none_skips_on_its_own(dry_run):
    """The kit's `pytest -m cuda -v` (its log) ran the CUDA tests and nothing else."""
    _, out = dry_run
    selected = [line.split(" ")[0] for line in (out / "pytest.log").read_text().splitlines()
                if line.startswith("tests/") and "::" in line and (" PASSED" in line or " SKIPPED" in line)]
    assert any(line.startswith("tests/test_operators_generic.py::test_cuda_matches_cpu") for line in selected)
    assert sum(line.startswith("tests/test_cuda.py::") for line in selected) >= 20
    assert all(line.startswith("tests/test_cuda.py::") or "::test_cuda_" in line for line in selected), selected
    for path in (REPO / "tests").glob("test_*.py"):  # a GPU test takes the fixture, which marks it
        if path.name != Path(__file__).name:
            assert "cuda.is_available()" not in path.read_text(), f"{path.name} checks for CUDA itself: use cuda_device"
