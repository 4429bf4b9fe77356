"""flowsteer's GPU validation kit, in one run (``scripts/gpu_check.sh`` installs the carried wheels, then runs this).

In order, each phase within what is left of ``--budget`` seconds, every result written into ``--out`` as it comes
(so a run stopped part-way keeps what finished):

1. the environment: GPU, driver, CUDA, torch, diffusers, transformers, kornia, lpips, accelerate, and that
   diffusers, kornia, lpips and flowsteer's packages import (``environment.json``);
2. the CUDA tests: ``pytest -m cuda`` (every test that takes the ``cuda_device`` fixture) on the GPU
   (``pytest.log``);
3. ``flowsteer speed`` on the full-size SD3.5-medium and FLUX.1-dev architectures (random bf16 weights) at 512,
   768 and 1024 pixels, 28 steps, every method (FLAIR with 5 data steps), then today's models (FLUX.2 [klein] 4B
   and Qwen-Image 20B) at 1024 with unguided, FlowChef (latent loss) and FLAIR, then ``--compile regional`` for the
   pair the targets watch most closely (unguided and FlowChef with a latent loss) at 1024, then the flow solvers
   (FlowDPS on SD3.5-medium, OT-ODE and Flower on PnP-Flow's pixel network), then the editors FlowEdit and
   RF-Inversion on SD3.5-medium and FLUX.1-dev at 1024 (``table.md``, ``results.json``, rewritten after every row).
   Each run starts only if time is left: the runs are in order of priority, the last ones first to go.

``--dry-run`` runs the same phases on the CPU with the tests' tiny backbones, 32 pixels and 2 steps, the CUDA
tests on the CPU and torch.compile's eager backend: the kit is known to work before a GPU is ever lent.

    bash scripts/gpu_check.sh --out "$OUT"            # on the GPU machine, wheels carried in .whl/
    bash scripts/gpu_check.sh --dry-run --out /tmp/k  # anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMAT = "flowsteer-gpu-check/1"
#: Packages the kit imports and reports; the first four are what the GPU machine's image lacks (scripts/wheels.txt).
PACKAGES = ("diffusers", "kornia", "kornia_rs", "lpips", "torch", "transformers", "accelerate", "safetensors",
            "tokenizers", "huggingface_hub", "numpy", "PIL", "skimage")
FLOWSTEER_PACKAGES = ("guidance", "operators", "tasks", "tasks.commands.cli", "tasks.commands.speed",
                      "guidance.backbones.sd3", "guidance.backbones.flux", "guidance.backbones.flux2",
                      "guidance.backbones.qwen_image", "tasks.random_models.sd3", "tasks.random_models.flux",
                      "tasks.random_models.flux2", "tasks.random_models.qwen_image", "tasks.random_models.generic")
METHODS = ("flowchef-latent", "flowchef-pixel", "flair", "pnp_flow", "dps")
OPTIONS = {"flair": {"data_steps": 5}}
#: (what, run_speed arguments) on the GPU, in the order they run.
GPU_RUNS = (
    ("full-size backbones, every method, eager",
     dict(backbones=["sd3.5-medium", "flux-dev"], methods=list(METHODS), sizes=[512, 768, 1024], steps=[28])),
    ("today's models at 1024: FLUX.2 [klein] 4B and Qwen-Image 20B, unguided, FlowChef (latent loss) and FLAIR",
     dict(backbones=["flux2-klein-4b", "qwen-image"], methods=["flowchef-latent", "flair"], sizes=[1024],
          steps=[28])),
    ("regional compile: unguided and FlowChef (latent loss) at 1024",
     dict(backbones=["sd3.5-medium", "flux-dev"], methods=["flowchef-latent"], sizes=[1024], steps=[28],
          compile="regional")),
    ("FlowDPS on SD3.5-medium at 768 and 1024, 28 steps",
     dict(backbones=["sd3.5-medium"], methods=["flowdps"], sizes=[768, 1024], steps=[28])),
    ("OT-ODE and Flower on the PnP-Flow network (pixel space) at 128 and 256, 100 steps",
     dict(backbones=["pnp-flow-unet"], methods=["ot_ode", "flower"], sizes=[128, 256], steps=[100])),
    ("FlowEdit and RF-Inversion on SD3.5-medium and FLUX.1-dev at 1024, 28 steps",
     dict(backbones=["sd3.5-medium", "flux-dev"], methods=["flowedit", "rf_inversion"], sizes=[1024], steps=[28])),
)
#: The same runs in miniature for the dry run on the CPU.
DRY_RUNS = (
    ("tiny backbones, every method, eager",
     dict(backbones=["tiny-sd3", "tiny-flux"], methods=list(METHODS), sizes=[32], steps=[2])),
    ("today's models in miniature: unguided, FlowChef (latent loss) and FLAIR",
     dict(backbones=["tiny-flux2-klein", "tiny-qwen-image"], methods=["flowchef-latent", "flair"], sizes=[32],
          steps=[2])),
    ("regional compile (eager backend): unguided and FlowChef (latent loss)",
     dict(backbones=["tiny-sd3", "tiny-flux"], methods=["flowchef-latent"], sizes=[32], steps=[2],
          compile="regional", compile_backend="eager")),
    ("FlowDPS in miniature", dict(backbones=["tiny-sd3"], methods=["flowdps"], sizes=[32], steps=[2])),
    ("OT-ODE and Flower on the pixel miniature", dict(backbones=["tiny-pixel"], methods=["ot_ode", "flower"],
                                                      sizes=[16], steps=[2])),
    ("FlowEdit and RF-Inversion in miniature",
     dict(backbones=["tiny-sd3", "tiny-flux"], methods=["flowedit", "rf_inversion"], sizes=[32], steps=[2])),
)
MARGIN = 15.0  # seconds kept for the last writes


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[gpu_check {stamp}] {message}", flush=True)


def write_json(path: Path, value) -> None:
    from guidance.loading.files import write_text_atomic

    write_text_atomic(path, json.dumps(value, indent=1, default=str) + "\n")


# -- 1. environment -------------------------------------------------------------------------------------------
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


def environment(dry_run: bool) -> dict:
    """Versions, the device, and which imports failed (``import_errors``: name -> one line)."""
    env: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "dry_run": dry_run, "python": platform.python_version(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "versions": {}, "import_errors": {}}
    for name in PACKAGES + FLOWSTEER_PACKAGES:
        try:
            version = _version(name)
            if name in PACKAGES:
                env["versions"][name] = version
        except Exception as error:  # reported, and the kit stops after writing it
            env["import_errors"][name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    import torch

    env["cuda_available"] = torch.cuda.is_available()
    env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                   driver=_driver())
    return env


# -- 2. CUDA tests --------------------------------------------------------------------------------------------
def summary_counts(text: str) -> dict[str, int]:
    """{"passed": N, "failed": N, ...} from pytest's closing line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|"
                                                   r"xpassed|warnings?)", lines[-1])}


def run_tests(out: Path, dry_run: bool, timeout: float) -> dict:
    """``pytest -m cuda`` in a subprocess (on the CPU in a dry run), its log in ``pytest.log``."""
    env = dict(os.environ)
    if dry_run:
        env.update(FLOWSTEER_CUDA_TESTS_DEVICE="cpu", FLOWSTEER_TEST_COMPILE_BACKEND="eager")
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rs", "-p", "no:cacheprovider", "tests"]
    begin = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1, timeout))
        text, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        text = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        text += f"\n[gpu_check] pytest stopped after {timeout:.0f} s (the kit's budget)\n"
        code = None
    (out / "pytest.log").write_text(f"$ {' '.join(command)}\n\n{text}")
    counts = summary_counts(text)
    no_gpu = "needs a CUDA GPU" in text
    result = {"command": " ".join(command[1:]), "exit_code": code, "counts": counts,
              "seconds": round(time.monotonic() - begin, 1),
              "ok": code == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not no_gpu}
    if no_gpu:
        result["problem"] = "tests were skipped for lack of a CUDA GPU"
    return result


# -- 3. speed -------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    """The kit's report: environment, tests, then every speed run's own table."""
    from tasks.commands.speed import markdown as speed_markdown

    env = report["environment"]
    v = env["versions"]
    device = (f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, compute {env.get('compute_capability')}), "
              f"driver {env.get('driver')}, CUDA {env.get('torch_cuda')}" if env.get("cuda_available")
              else "no CUDA GPU (CPU)")
    lines = [f"# flowsteer GPU check{' (dry run)' if env['dry_run'] else ''}", "",
             f"{env['date']} · {device} · torch {v.get('torch')} · diffusers {v.get('diffusers')} · transformers "
             f"{v.get('transformers')} · kornia {v.get('kornia')} · lpips {v.get('lpips')} · Python {env['python']}",
             "", f"Command: `{report['command']}`", ""]
    if env["import_errors"]:
        lines += ["Imports that failed:", "", *(f"* {k}: {e}" for k, e in env["import_errors"].items()), ""]
    tests = report.get("tests")
    if tests:
        counts = ", ".join(f"{n} {word}" for word, n in tests["counts"].items()) or "no summary line"
        lines += [f"CUDA tests (`{tests['command']}`): {counts}, exit {tests['exit_code']}, {tests['seconds']} s"
                  + (f" — {tests['problem']}" if tests.get("problem") else ""), ""]
    for run in report["speed"]:
        lines += [f"# Speed: {run['what']}", ""]
        if run.get("error"):
            lines += [f"failed: {run['error']}", ""]
        if run["results"]:
            lines += [speed_markdown(run["results"]).split("\n", 2)[2]]
    return "\n".join(lines) + "\n"


def run_kit(out: Path, dry_run: bool, budget: float, repeats: int, command: str) -> int:
    begin = time.monotonic()

    def left() -> float:
        return budget - (time.monotonic() - begin)

    out.mkdir(parents=True, exist_ok=True)
    env = environment(dry_run)
    report = {"format": FORMAT, "command": command, "environment": env, "tests": None, "speed": []}
    write_json(out / "environment.json", env)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    log(f"{env.get('gpu', 'CPU')}, driver {env.get('driver')}, CUDA {env['torch_cuda']}; {versions}")
    if env["import_errors"]:
        for name, error in env["import_errors"].items():
            log(f"import {name} failed: {error}")
        write_json(out / "results.json", report)
        return 2
    if not dry_run and not env["cuda_available"]:
        log("no CUDA GPU here: run with --dry-run on a machine without one")
        return 2

    def save() -> None:
        from guidance.loading.files import write_text_atomic

        write_json(out / "results.json", report)
        write_text_atomic(out / "table.md", markdown(report))

    log("CUDA tests: pytest -m cuda" + (" (on the CPU: dry run)" if dry_run else ""))
    report["tests"] = run_tests(out, dry_run, min(left() * 0.3, 240.0))
    log(f"CUDA tests: {report['tests']['counts']} (exit {report['tests']['exit_code']}, "
        f"{report['tests']['seconds']} s)")
    save()

    runs = DRY_RUNS if dry_run else GPU_RUNS
    with tempfile.TemporaryDirectory(prefix="flowsteer-gpu-check-") as scratch:  # each run's own files
        run_speed_rows(runs, Path(scratch), report, save, left, repeats)
    unmeasured = [f"{r['backbone']} {r['size']}px {r['method']}: {r['reason']}"
                  for run in report["speed"] if run["results"] for r in run["results"]["rows"]
                  if r["status"] != "measured"]
    unmeasured += [f"{run['what']}: {run['error']}" for run in report["speed"] if run.get("error")]
    print(markdown(report))
    for line in unmeasured:
        log(f"not measured: {line}")
    ok = report["tests"]["ok"] and not unmeasured and len(report["speed"]) == len(runs)
    log(f"done in {time.monotonic() - begin:.0f} s: {'all measured, tests passed' if ok else 'see above'}")
    return 0 if ok else 1


def run_speed_rows(runs, scratch: Path, report: dict, save, left, repeats: int) -> None:
    """Each speed run in turn, within the time left, its rows saved into the report as they come."""
    from tasks.commands.speed import run_speed

    for index, (what, arguments) in enumerate(runs):
        remaining = left() - MARGIN
        if remaining <= 0:
            log(f"speed: no time left for {what}")
            break
        log(f"speed: {what} ({remaining:.0f} s left)")
        entry = {"what": what, "results": None}
        report["speed"].append(entry)

        def on_row(results: dict, entry=entry) -> None:
            entry["results"] = results
            save()

        options = {row: values for row, values in OPTIONS.items() if row in arguments["methods"]}
        arguments = {"repeats": repeats, "options": options, "isolate": False, **arguments}
        try:
            entry["results"] = run_speed(**arguments, out=scratch / f"run{index}", overwrite=True, progress=True,
                                         time_budget=remaining, on_row=on_row)
        except Exception as error:  # recorded; the next run still goes
            entry["error"] = f"{type(error).__name__}: {str(error).strip()[:500]}"
            log(f"speed: {what} failed: {entry['error']}")
        save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where environment.json, pytest.log, table.md and "
                                                                "results.json go")
    parser.add_argument("--dry-run", action="store_true", help="the same phases on the CPU with tiny backbones")
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for the whole kit (default 510)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per speed cell after the warm-up")
    args = parser.parse_args(argv)
    command = "bash scripts/gpu_check.sh" + (" --dry-run" if args.dry_run else "")
    return run_kit(args.out, args.dry_run, args.budget, args.repeats, command)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
