"""flowsteer's GPU validation kit in two parts that each fit one device call of 5 minutes
(``scripts/gpu_check.sh`` installs the carried wheels, then runs this).

Part 1: the environment and the CUDA tests (pytest starts first, so that its imports overlap the kit's), then
``flowsteer speed`` on the full-size SD3.5-medium and FLUX.1-dev architectures (random bf16 weights) at 512, 768
and 1024 pixels, 28 steps, every method (FLAIR with 5 data steps). Part 2: the environment again, then today's
models (FLUX.2 [klein] 4B and Qwen-Image 20B) at 1024 with unguided, FlowChef (latent loss) and FLAIR, the flow
solvers (FlowDPS on SD3.5-medium, OT-ODE and Flower on PnP-Flow's pixel network), the editors FlowEdit and
RF-Inversion on SD3.5-medium and FLUX.1-dev at 1024, and ``--compile regional`` for unguided and FlowChef (latent
loss) at 1024. Without ``--part`` both run in order, each within its own ``--budget``.

Within a part the runs go in order of priority, and each starts only if its estimated seconds
(``tasks.commands.speed.estimate_speed``: the full-size backbones on an H100, rescaled by how long this part's
earlier runs took against their estimates) fit in what is left of the part's budget; inside a run, ``flowsteer
speed``'s own time budget starts a cell only if its estimate fits. Everything is written into ``--out``/partN/
as it comes (``environment.json``, part 1's ``pytest.log``, ``results.json``, ``table.md``), so a part stopped
half-way keeps what finished and part 2 never overwrites part 1; ``--out``/table.md joins both parts' tables once
both are there.

``--dry-run`` runs the same phases on the CPU with the tests' tiny backbones at one size and 1 or 2 steps, two of
the CUDA tests on the CPU and torch.compile's eager backend: the kit is known to work before a GPU is ever lent.

    bash scripts/gpu_check.sh --part 1 --out "$OUT"             # on the GPU machine, wheels carried in .whl/
    bash scripts/gpu_check.sh --part 2 --out "$OUT"
    bash scripts/gpu_check.sh --dry-run --out /tmp/k            # anywhere: both parts in miniature
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMAT = "flowsteer-gpu-check/2"
PARTS = (1, 2)
#: Packages the kit imports and reports; the first four are what the GPU machine's image lacks (scripts/wheels.txt).
PACKAGES = ("diffusers", "kornia", "kornia_rs", "lpips", "torch", "transformers", "accelerate", "safetensors",
            "tokenizers", "huggingface_hub", "numpy", "PIL", "skimage")
FLOWSTEER_PACKAGES = ("guidance", "operators", "tasks", "tasks.commands.cli", "tasks.commands.speed",
                      "guidance.backbones.sd3", "guidance.backbones.flux", "guidance.backbones.flux2",
                      "guidance.backbones.qwen_image", "tasks.random_models.sd3", "tasks.random_models.flux",
                      "tasks.random_models.flux2", "tasks.random_models.qwen_image", "tasks.random_models.generic")
#: distribution -> module of the packages whose versions flowsteer was tested with (``.whl/tested_with.json``,
#: written by scripts/make_wheels.sh); a different major.minor version on the device is flagged
TESTED_WITH = {"torch": "torch", "transformers": "transformers", "huggingface-hub": "huggingface_hub",
               "diffusers": "diffusers"}
METHODS = ("flowchef-latent", "flowchef-pixel", "flair", "pnp_flow", "dps")
OPTIONS = {"flair": {"data_steps": 5}}
FULL = dict(sizes=[1024], steps=[28])
TINY = dict(sizes=[32], steps=[1])  # Qwen-Image's terminal shift and OT-ODE's start time need 2 steps
#: (part, what, run_speed arguments on the GPU, the same run in miniature for the dry run on the CPU), in order
#: of priority within each part. A further run (another backbone, another switch of run_speed) is one entry.
RUNS = (
    (1, "SD3.5-medium at 512, 768 and 1024, every method",
     dict(backbones=["sd3.5-medium"], methods=list(METHODS), sizes=[512, 768, 1024], steps=[28]),
     dict(backbones=["tiny-sd3"], methods=list(METHODS), **TINY)),
    (1, "FLUX.1-dev at 1024, every method",
     dict(backbones=["flux-dev"], methods=list(METHODS), **FULL),
     dict(backbones=["tiny-flux"], methods=list(METHODS), **TINY)),
    (1, "FLUX.1-dev at 512 and 768, every method",
     dict(backbones=["flux-dev"], methods=list(METHODS), sizes=[512, 768], steps=[28]),
     dict(backbones=["tiny-flux"], methods=list(METHODS), sizes=[16], steps=[1])),
    (2, "FLUX.2 [klein] 4B at 1024: unguided, FlowChef (latent loss) and FLAIR",
     dict(backbones=["flux2-klein-4b"], methods=["flowchef-latent", "flair"], **FULL),
     dict(backbones=["tiny-flux2-klein"], methods=["flowchef-latent", "flair"], **TINY)),
    (2, "Qwen-Image 20B at 1024: unguided, FlowChef (latent loss) and FLAIR",
     dict(backbones=["qwen-image"], methods=["flowchef-latent", "flair"], **FULL),
     dict(backbones=["tiny-qwen-image"], methods=["flowchef-latent", "flair"], sizes=[32], steps=[2])),
    (2, "memory profile 8bit: FLUX.1-dev at 1024, unguided and FlowChef (latent loss), int8 transformer blocks",
     dict(backbones=["flux-dev"], methods=["flowchef-latent"], memory="8bit", **FULL),
     dict(backbones=["tiny-flux"], methods=["flowchef-latent"], memory="8bit", **TINY)),
    (2, "memory profile low: SD3.5-medium at 1024, unguided and FlowChef (latent loss), model CPU offload",
     dict(backbones=["sd3.5-medium"], methods=["flowchef-latent"], memory="low", **FULL),
     dict(backbones=["tiny-sd3"], methods=["flowchef-latent"], memory="low", **TINY)),
    (2, "FlowDPS on SD3.5-medium at 768 and 1024, 28 steps",
     dict(backbones=["sd3.5-medium"], methods=["flowdps"], sizes=[768, 1024], steps=[28]),
     dict(backbones=["tiny-sd3"], methods=["flowdps"], **TINY)),
    (2, "OT-ODE and Flower on the PnP-Flow network (pixel space) at 128 and 256, 100 steps",
     dict(backbones=["pnp-flow-unet"], methods=["ot_ode", "flower"], sizes=[128, 256], steps=[100]),
     dict(backbones=["tiny-pixel"], methods=["ot_ode", "flower"], sizes=[16], steps=[2])),
    (2, "FlowEdit and RF-Inversion on SD3.5-medium at 1024, 28 steps",
     dict(backbones=["sd3.5-medium"], methods=["flowedit", "rf_inversion"], **FULL),
     dict(backbones=["tiny-sd3"], methods=["flowedit", "rf_inversion"], **TINY)),
    (2, "FlowEdit and RF-Inversion on FLUX.1-dev at 1024, 28 steps",
     dict(backbones=["flux-dev"], methods=["flowedit", "rf_inversion"], **FULL),
     dict(backbones=["tiny-flux"], methods=["flowedit", "rf_inversion"], **TINY)),
    (2, "regional compile: SD3.5-medium unguided and FlowChef (latent loss) at 1024",
     dict(backbones=["sd3.5-medium"], methods=["flowchef-latent"], compile="regional", **FULL),
     dict(backbones=["tiny-sd3"], methods=["flowchef-latent"], compile="regional", compile_backend="eager",
          **TINY)),
    (2, "regional compile: FLUX.1-dev unguided and FlowChef (latent loss) at 1024",
     dict(backbones=["flux-dev"], methods=["flowchef-latent"], compile="regional", **FULL),
     dict(backbones=["tiny-flux"], methods=["flowchef-latent"], compile="regional", compile_backend="eager",
          **TINY)),
)
#: (part, what, run_speed arguments) on the GPU, and in the dry run
GPU_RUNS = tuple((part, what, gpu) for part, what, gpu, _ in RUNS)
DRY_RUNS = tuple((part, what, dry) for part, what, _, dry in RUNS)
#: the CUDA tests part 1 runs: all of them on the GPU, two quick ones (seeded sampling with device generators, an
#: analytic flow in float64) in the dry run, where the phase itself is what is checked
GPU_CUDA_TESTS = ("tests",)
DRY_CUDA_TESTS = ("tests/test_cuda.py::test_generators_on_the_device_are_reproducible_and_batch",
                  "tests/test_cuda.py::test_analytic_flow_on_the_device_equals_the_cpu_in_float64")
BUDGET = 270.0     # seconds per part for this script: 5 minutes with the wheel install and interpreter start
TESTS_LIMIT = 120.0  # seconds the CUDA tests may take at most, from their start
MARGIN = 10.0      # seconds kept for the last writes
TIME_REASON = "the time budget"  # how run_speed's rows skipped for lack of time begin their reason


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[gpu_check {stamp}] {message}", flush=True)


def write_json(path: Path, value) -> None:
    from guidance.loading.files import write_text_atomic

    write_text_atomic(path, json.dumps(value, indent=1, default=str) + "\n")


# -- the environment ------------------------------------------------------------------------------------------
DISTRIBUTIONS = {"PIL": "pillow", "skimage": "scikit-image", "kornia_rs": "kornia-rs"}


def _version(name: str) -> str:
    """Import ``name`` and return its distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    module = import_module(name)
    try:
        return version(DISTRIBUTIONS.get(name, name))
    except PackageNotFoundError:  # flowsteer's own packages (a source tree on the path)
        return str(getattr(module, "__version__", "source"))


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _major_minor(version: str) -> tuple[int, int] | None:
    found = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(found[1]), int(found[2])) if found else None


def tested_with(path: Path, versions: dict[str, str]) -> dict:
    """What ``path`` (``.whl/tested_with.json``) says flowsteer was tested with, beside the versions here, and the
    packages whose major.minor versions differ (``mismatches``: name -> {here, tested})."""
    try:
        tested = json.loads(path.read_text())
    except FileNotFoundError:
        return {"file": str(path), "problem": "not found (scripts/make_wheels.sh writes it)", "mismatches": {}}
    except (OSError, ValueError) as error:
        return {"file": str(path), "problem": f"unreadable: {error}", "mismatches": {}}
    tested_versions = tested.get("versions", {})
    mismatches = {}
    for distribution, module in TESTED_WITH.items():
        here, then = versions.get(module), tested_versions.get(distribution)
        if here and then and _major_minor(here) != _major_minor(then):
            mismatches[distribution] = {"here": here, "tested": then}
    return {"file": str(path), "versions": tested_versions, "python": tested.get("python"),
            "date": tested.get("date"), "mismatches": mismatches}


def environment(dry_run: bool, tested_with_file: Path) -> dict:
    """Versions, the device, which imports failed (``import_errors``: name -> one line), the versions flowsteer
    was tested with and the seconds the wheel install took (from gpu_check.sh)."""
    env: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "dry_run": dry_run, "python": platform.python_version(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "versions": {}, "import_errors": {},
                 "wheel_install_seconds": _float_or_none(os.environ.get("GPU_CHECK_INSTALL_SECONDS"))}
    for name in PACKAGES + FLOWSTEER_PACKAGES:
        try:
            version = _version(name)
            if name in PACKAGES:
                env["versions"][name] = version
        except Exception as error:  # reported, and the kit stops after writing it
            env["import_errors"][name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    env["tested_with"] = tested_with(tested_with_file, env["versions"])
    import torch

    env["cuda_available"] = torch.cuda.is_available()
    env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                   driver=_driver())
    return env


def _float_or_none(text: str | None) -> float | None:
    try:
        return round(float(text), 1) if text else None
    except ValueError:
        return None


# -- the CUDA tests -------------------------------------------------------------------------------------------
def summary_counts(text: str) -> dict[str, int]:
    """{"passed": N, "failed": N, ...} from pytest's closing line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|"
                                                   r"xpassed|warnings?)", lines[-1])}


class CudaTests:
    """``pytest -m cuda`` on ``selection`` in a subprocess (on the CPU in a dry run), started at once so that its
    imports overlap the kit's reading of the environment (the tests are not timed); its output goes to
    ``pytest.log`` as it comes."""

    def __init__(self, folder: Path, dry_run: bool, selection: tuple[str, ...]):
        env = dict(os.environ)
        if dry_run:
            env.update(FLOWSTEER_CUDA_TESTS_DEVICE="cpu", FLOWSTEER_TEST_COMPILE_BACKEND="eager")
        self.command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rs", "-p", "no:cacheprovider",
                        *selection]
        self.log = folder / "pytest.log"
        self.begin = time.monotonic()
        self._file = self.log.open("w")
        self._file.write(f"$ {' '.join(self.command)}\n\n")
        self._file.flush()
        self.process = subprocess.Popen(self.command, cwd=REPO, env=env, stdout=self._file,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def stop(self, why: str) -> None:
        """End pytest (and whatever it started) now, saying ``why`` in the log."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self._file.write(f"\n[gpu_check] pytest stopped: {why}\n")
        self._file.close()

    def result(self, limit: float) -> dict:
        """Wait for pytest until ``limit`` seconds after its start (then stop it); its counts and whether it
        passed."""
        try:
            code = self.process.wait(timeout=max(1.0, limit - (time.monotonic() - self.begin)))
        except subprocess.TimeoutExpired:
            self.stop(f"still running after {limit:.0f} s (the kit's limit for the CUDA tests)")
            code = None
        self._file.close()
        text = self.log.read_text()
        counts = summary_counts(text)
        no_gpu = "needs a CUDA GPU" in text
        result = {"command": " ".join(self.command[1:]), "exit_code": code, "counts": counts,
                  "seconds": round(time.monotonic() - self.begin, 1),
                  "ok": code == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not no_gpu}
        if no_gpu:
            result["problem"] = "tests were skipped for lack of a CUDA GPU"
        return result


# -- the report -----------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    """One part's report: environment, tests, then every speed run's own table (or why it did not start)."""
    from tasks.commands.speed import markdown as speed_markdown

    env = report["environment"]
    v = env["versions"]
    device = (f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, compute {env.get('compute_capability')}), "
              f"driver {env.get('driver')}, CUDA {env.get('torch_cuda')}" if env.get("cuda_available")
              else "no CUDA GPU (CPU)")
    lines = [f"# flowsteer GPU check, part {report['part']}{' (dry run)' if env['dry_run'] else ''}", "",
             f"{env['date']} · {device} · torch {v.get('torch')} · diffusers {v.get('diffusers')} · transformers "
             f"{v.get('transformers')} · kornia {v.get('kornia')} · lpips {v.get('lpips')} · Python {env['python']}",
             "", f"Command: `{report['command']}` (budget {report['budget_seconds']:g} s)", ""]
    tested = env["tested_with"]
    if tested.get("problem"):
        lines += [f"Tested with: {tested['file']} {tested['problem']}.", ""]
    else:
        pairs = ", ".join(f"{name} {tested['versions'].get(name)} (here {v.get(module)})"
                          for name, module in TESTED_WITH.items())
        flagged = "; major.minor differs: " + ", ".join(tested["mismatches"]) if tested["mismatches"] else ""
        lines += [f"Tested with: {pairs}{flagged}.", ""]
    if env["import_errors"]:
        lines += ["Imports that failed:", "", *(f"* {k}: {e}" for k, e in env["import_errors"].items()), ""]
    tests = report.get("tests")
    if tests:
        counts = ", ".join(f"{n} {word}" for word, n in tests["counts"].items()) or "no summary line"
        lines += [f"CUDA tests (`{tests['command']}`): {counts}, exit {tests['exit_code']}, {tests['seconds']} s"
                  + (f" — {tests['problem']}" if tests.get("problem") else ""), ""]
    for run in report["speed"]:
        lines += [f"# Speed: {run['what']}", "",
                  f"Estimated {run['estimated_seconds']:.0f} s" + (f", took {run['seconds']:.0f} s."
                                                                    if "seconds" in run else "."), ""]
        if run.get("not_started"):
            lines += [f"not started: {run['not_started']}", ""]
        if run.get("error"):
            lines += [f"failed: {run['error']}", ""]
        if run.get("results"):
            lines += [speed_markdown(run["results"]).split("\n", 2)[2]]
    return "\n".join(lines) + "\n"


def _merge_tables(out: Path) -> None:
    """``out``/table.md: both parts' tables, once both are in ``out``."""
    from guidance.loading.files import write_text_atomic

    tables = [out / f"part{part}" / "table.md" for part in PARTS]
    if all(table.exists() for table in tables):
        write_text_atomic(out / "table.md", "\n".join(table.read_text() for table in tables))


# -- one part -------------------------------------------------------------------------------------------------
def run_part(part: int, out: Path, dry_run: bool, budget: float, repeats: int, cuda_tests: tuple[str, ...],
             tested_with_file: Path, command: str) -> int:
    """One part of the kit into ``out``/partN/; returns 0 when everything that ran passed or was measured (runs
    left out for lack of time are reported, not failures), 1 otherwise, 2 when the environment is unusable."""
    begin = time.monotonic()

    def left() -> float:
        return budget - (time.monotonic() - begin)

    folder = out / f"part{part}"
    folder.mkdir(parents=True, exist_ok=True)
    log(f"part {part}{' (dry run)' if dry_run else ''}: budget {budget:g} s")
    tests = None
    if part == 1:
        log(f"CUDA tests: pytest -m cuda {' '.join(cuda_tests)}" + (" (on the CPU: dry run)" if dry_run else ""))
        tests = CudaTests(folder, dry_run, cuda_tests)
    try:
        env = environment(dry_run, tested_with_file)
    except BaseException:
        if tests is not None:
            tests.stop("the kit stopped while reading the environment")
        raise
    report = {"format": FORMAT, "part": part, "command": command, "budget_seconds": budget, "environment": env,
              "tests": None, "speed": []}
    write_json(folder / "environment.json", env)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    log(f"{env.get('gpu', 'CPU')}, driver {env.get('driver')}, CUDA {env['torch_cuda']}; {versions}"
        + (f"; wheels installed in {env['wheel_install_seconds']} s" if env["wheel_install_seconds"] else ""))
    tested = env["tested_with"]
    if tested.get("problem"):
        log(f"tested-with versions: {tested['file']} {tested['problem']}")
    for name, pair in tested["mismatches"].items():
        log(f"version mismatch: {name} {pair['here']} here, flowsteer was tested with {pair['tested']} "
            f"(major.minor differ)")
    unusable = [f"import {name} failed: {error}" for name, error in env["import_errors"].items()]
    if not dry_run and not env["cuda_available"]:
        unusable.append("no CUDA GPU here: run with --dry-run on a machine without one")
    if unusable:
        for line in unusable:
            log(line)
        if tests is not None:
            tests.stop(unusable[0])
        write_json(folder / "results.json", report)
        return 2

    def save() -> None:
        from guidance.loading.files import write_text_atomic

        write_json(folder / "results.json", report)
        write_text_atomic(folder / "table.md", markdown(report))
        _merge_tables(out)

    if tests is not None:
        report["tests"] = tests.result(min(budget * 0.5, TESTS_LIMIT))
        log(f"CUDA tests: {report['tests']['counts']} (exit {report['tests']['exit_code']}, "
            f"{report['tests']['seconds']} s)")
    save()

    runs = [(what, arguments) for p, what, arguments in (DRY_RUNS if dry_run else GPU_RUNS) if p == part]
    with tempfile.TemporaryDirectory(prefix="flowsteer-gpu-check-") as scratch:  # each run's own files
        run_speed_rows(runs, Path(scratch), report, save, left, repeats)
    print(markdown(report))
    return _verdict(report, runs, time.monotonic() - begin)


def _verdict(report: dict, runs: list, seconds: float) -> int:
    """Log what failed and what was left out for lack of time; 0 when nothing failed."""
    failures, short = [], []
    for run in report["speed"]:
        if run.get("not_started"):
            short.append(f"{run['what']} ({run['not_started']})")
        if run.get("error"):
            failures.append(f"{run['what']}: {run['error']}")
        for row in (run.get("results") or {}).get("rows", []):
            if row["status"] != "measured":
                line = f"{row['backbone']} {row['size']}px {row['method']}: {row['reason']}"
                (short if row["reason"].startswith(TIME_REASON) else failures).append(line)
    tests = report["tests"]
    if tests is not None and not tests["ok"]:
        failures.append(f"CUDA tests: {tests['counts']} (exit {tests['exit_code']})")
    for line in failures:
        log(f"failed: {line}")
    for line in short:
        log(f"left out for lack of time: {line}")
    started = sum(not run.get("not_started") for run in report["speed"])
    summary = (("tests passed; " if tests is not None else "")
               + (f"all {len(runs)} runs measured" if started == len(runs) and not short
                  else f"{started} of {len(runs)} runs started, {len(short)} left out for lack of time"))
    log(f"part {report['part']} done in {seconds:.0f} s: " + (summary if not failures else "failures, see above"))
    return 1 if failures else 0


def run_speed_rows(runs, scratch: Path, report: dict, save, left, repeats: int) -> None:
    """Each speed run in turn, started only if its estimate (rescaled by how long this part's earlier runs took
    against theirs) fits in the time left, its rows saved into the report as they come."""
    from tasks.commands.speed import estimate_speed, run_speed

    estimated = took = 0.0
    for index, (what, arguments) in enumerate(runs):
        options = {row: values for row, values in OPTIONS.items() if row in arguments["methods"]}
        arguments = {"repeats": repeats, "options": options, "isolate": False, **arguments}
        estimate = estimate_speed(**arguments)
        scale = took / estimated if estimated > 0 and took > 0 else 1.0
        entry = {"what": what, "arguments": arguments, "estimated_seconds": estimate, "results": None}
        report["speed"].append(entry)
        remaining = left() - MARGIN
        if estimate * scale > remaining:
            entry["not_started"] = (f"estimated {estimate * scale:.0f} s (prior {estimate:.0f} s x {scale:.2f}, "
                                    f"the ratio of this part's runs so far), {max(remaining, 0):.0f} s left")
            log(f"speed: not started: {what}: {entry['not_started']}")
            save()
            continue
        log(f"speed: {what} (estimated {estimate * scale:.0f} s, {remaining:.0f} s left)")

        def on_row(results: dict, entry=entry) -> None:
            entry["results"] = results
            save()

        begin = time.monotonic()
        try:
            entry["results"] = run_speed(**arguments, out=scratch / f"run{index}", overwrite=True, progress=True,
                                         time_budget=remaining, on_row=on_row)
        except Exception as error:  # recorded; the next run still goes
            entry["error"] = f"{type(error).__name__}: {str(error).strip()[:500]}"
            log(f"speed: {what} failed: {entry['error']}")
        entry["seconds"] = time.monotonic() - begin
        if "error" not in entry:  # a run that failed early says nothing of the machine's speed
            estimated, took = estimated + estimate, took + entry["seconds"]
        save()


def _cuda_tests(values: list[str] | None, dry_run: bool) -> tuple[str, ...]:
    """The CUDA-test selection: pytest paths or node ids inside the repository."""
    if values is None:
        return DRY_CUDA_TESTS if dry_run else GPU_CUDA_TESTS
    for value in values:
        path = value.split("::", 1)[0]
        if not (REPO / path).exists():
            raise ValueError(f"--cuda-tests {value}: {path} is not in {REPO}; give test paths or node ids such as "
                             f"{DRY_CUDA_TESTS[0]}")
    return tuple(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="where part1/ and part2/ (environment.json, pytest.log, results.json, table.md) go")
    parser.add_argument("--part", type=int, choices=PARTS,
                        help="1: environment, CUDA tests, SD3.5-medium and FLUX.1-dev; 2: environment, today's "
                             "models, the flow solvers, the editors, regional compile (default: both, in order)")
    parser.add_argument("--dry-run", action="store_true", help="the same phases on the CPU with tiny backbones")
    parser.add_argument("--budget", type=float, default=BUDGET,
                        help=f"seconds for each part (default {BUDGET:g}: with the wheel install, 5 minutes)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per speed cell after the warm-up")
    parser.add_argument("--cuda-tests", nargs="+", metavar="TEST",
                        help="pytest paths or node ids of part 1's CUDA tests (default: tests/ on the GPU, two of "
                             "tests/test_cuda.py in a dry run)")
    parser.add_argument("--tested-with", type=Path, default=REPO / ".whl" / "tested_with.json",
                        help="the versions flowsteer was tested with (default .whl/tested_with.json, written by "
                             "scripts/make_wheels.sh)")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget takes a positive number of seconds, got {args.budget:g}")
    if args.repeats < 1:
        parser.error(f"--repeats takes a positive number of timed runs, got {args.repeats}")
    if args.cuda_tests is not None and args.part == 2:
        parser.error("--cuda-tests selects part 1's CUDA tests, and part 2 runs none: drop it or use --part 1")
    try:
        cuda_tests = _cuda_tests(args.cuda_tests, args.dry_run)
    except ValueError as error:
        parser.error(str(error))
    parts = PARTS if args.part is None else (args.part,)
    codes = []
    for part in parts:
        command = (f"bash scripts/gpu_check.sh --part {part}" + (" --dry-run" if args.dry_run else ""))
        codes.append(run_part(part, args.out, args.dry_run, args.budget, args.repeats, cuda_tests,
                              args.tested_with, command))
    return max(codes)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
