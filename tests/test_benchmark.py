"""`flowsteer benchmark` on a tiny SD3 folder: outputs, resuming after an interruption, sharding over two
processes (accelerate launch), and bad input. 2 images x 2 operators x 2 methods, 2 steps, 32x32."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.commands.benchmark import state as benchmark
from tasks.commands.benchmark import (
    parse_method_options,
    run_benchmark,
    split_methods,
    split_operators,
)
from tasks.commands.cli import main
from tasks.outputs.image_io import load_image, save_image

ROOT = Path(__file__).resolve().parents[1]
OPERATORS = "sr:factor=2;gaussian_blur:sigma=1,kernel_size=5"
METHODS = "pseudo_inverse,flowchef"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small non-square photos (center-cropped and resized to 32x32 by the benchmark), plus a non-image."""
    folder = tmp_path_factory.mktemp("photos")
    y, x = torch.meshgrid(torch.linspace(-1, 1, 40), torch.linspace(-1, 1, 48), indexing="ij")
    save_image(torch.stack([x, y, x * y])[None] * 0.8, folder / "a.png")
    save_image(torch.stack([y, x * y, x])[None] * 0.6, folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def arguments(images, model, out, *extra):
    return ["benchmark", "--images", str(images), "--operators", OPERATORS, "--methods", METHODS, "--model",
            str(model), "--out", str(out), "--steps", "2", "--size", "32", "--quiet", *map(str, extra)]


@pytest.fixture(scope="module")
def reference(images, tiny_sd3_folder, tmp_path_factory):
    """An uninterrupted single-process run through the command line."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = tmp_path_factory.mktemp("bench") / "full"
    assert main(arguments(images, tiny_sd3_folder, out)) == 0
    return out


def quality(summary: dict) -> dict:
    """summary.json without the fields that differ between runs (time and memory)."""
    strip = lambda rows: [{k: v for k, v in row.items() if k not in benchmark.TIMING_FIELDS} for row in rows]
    return {**summary, "groups": strip(summary["groups"]), "items": strip(summary["items"])}


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def cli_error(capsys, argv, *needles):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("flowsteer: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- happy path ----------------------------------------------------------------------------------------------
def test_outputs(reference, tiny_sd3_folder):
    items = sorted(p.name for p in (reference / "items").iterdir())
    assert len([n for n in items if n.endswith(".json")]) == 8 and len(items) == 8 + 8 + 4
    assert "a__sr-factor-2__flowchef.png" in items
    assert "b__gaussian_blur-sigma-1-kernel_size-5__measurement.png" in items
    record = json.loads((reference / "items" / "a__sr-factor-2__flowchef.json").read_text())
    assert record["status"] == "ok" and record["nfe"] == 2 and record["settings"]["num_steps"] == 2
    assert load_image(reference / record["restored"]).shape[-2:] == (32, 32)
    assert load_image(reference / record["measurement"]).shape[-2:] == (16, 16)

    summary = read_summary(reference)
    assert summary["settings"]["model"] == str(Path(tiny_sd3_folder).resolve())
    assert [i["name"] for i in summary["settings"]["images"]] == ["a", "b"] and summary["settings"]["size"] == 32
    groups = summary["groups"]
    assert [(g["operator"], g["method"]) for g in groups] == [
        ("sr:factor=2", "pseudo_inverse"), ("sr:factor=2", "flowchef"),
        ("gaussian_blur:sigma=1,kernel_size=5", "pseudo_inverse"), ("gaussian_blur:sigma=1,kernel_size=5", "flowchef")]
    assert all(g["n"] == 2 and isinstance(g["psnr"], float) and 0 < g["ssim"] <= 1 for g in groups)
    assert [g["nfe"] for g in groups] == [0, 2, 0, 2] and len(summary["items"]) == 8
    # the same measurement for every method of an image and operator: the seed is per image
    assert summary["items"][0]["seed"] == summary["items"][1]["seed"] == 0 and summary["items"][4]["seed"] == 2

    markdown = (reference / "summary.md").read_text()
    assert "| sr:factor=2 | flowchef | 2 | 0 |" in markdown
    csv_lines = (reference / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("operator,method,n,diverged,psnr,ssim,lpips") and len(csv_lines) == 5
    lpips = groups[0]["lpips"]
    if isinstance(lpips, str):  # no AlexNet weights here: said so, never a number
        assert lpips.startswith("unavailable: ") and "LPIPS unavailable: " in markdown
        assert ",unavailable," in csv_lines[1] and not (reference / "plots" / "lpips.png").exists()
    else:
        assert (reference / "plots" / "lpips.png").is_file()
    for name in ("psnr", "ssim"):
        assert (reference / "plots" / f"{name}.png").is_file()
    grid = load_image(reference / "grids" / "a.png")  # 2 rows (operators) x 4 columns, with captions
    cell = (grid.shape[-1] - 2) / 4 - 2  # 32x32 images enlarged 4x to 128, wider for long captions
    from tasks.outputs.grid import _font, _line_height

    caption = 2 * _line_height(_font()) + 2  # two lines under the methods: name and PSNR
    assert cell == int(cell) and cell >= 128 and grid.shape[-2] == 2 * (128 + caption + 2) + 2
    assert not list(reference.rglob("*.part"))


def test_resume_after_interruption(reference, images, tiny_sd3_folder, tmp_path):
    out = tmp_path / "resumed"
    seen = []

    def stop_after_three(record):
        seen.append(record["item"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    kwargs = {"model": tiny_sd3_folder, "out": out, "num_steps": 2, "size": 32, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(images, split_operators(OPERATORS), split_methods(METHODS), on_item=stop_after_three, **kwargs)
    assert len(list((out / "items").glob("*.json"))) == 3 and not (out / "summary.json").exists()
    assert not list(out.rglob("*.part"))
    first = {p.name: p.stat().st_mtime_ns for p in (out / "items").glob("*.json")}

    again = run_benchmark(images, OPERATORS, METHODS, **kwargs)
    assert (again.computed, again.skipped) == (5, 3)
    assert {p: (out / "items" / p).stat().st_mtime_ns for p in first} == first
    assert quality(read_summary(out)) == quality(read_summary(reference))
    finished = run_benchmark(images, OPERATORS, METHODS, **kwargs)
    assert (finished.computed, finished.skipped) == (0, 8)


def test_sharded_over_two_processes_matches_one(reference, images, tiny_sd3_folder, tmp_path):
    """accelerate launch starts 2 CPU processes (RANK / WORLD_SIZE); process 0 merges the summary."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    out = tmp_path / "sharded"
    argv = arguments(images, tiny_sd3_folder, out)[1:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if launcher:
        command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29571",
                   "-m", "tasks.commands.benchmark", *argv]
        done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    else:  # the same protocol by hand
        procs = [subprocess.Popen([sys.executable, "-m", "tasks.commands.benchmark", *argv], cwd=ROOT,
                                  env={**env, "RANK": str(r), "WORLD_SIZE": "2"}) for r in (1, 0)]
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert quality(read_summary(out)) == quality(read_summary(reference))
    assert not (out / "shards").exists() or not list((out / "shards").iterdir())


def test_overwrite_and_divergence(images, tiny_sd3_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    base = ["benchmark", "--images", str(images), "--model", str(tiny_sd3_folder), "--out", str(out), "--steps", "1",
            "--size", "32", "--limit", "1", "--quiet", "--methods", "pseudo_inverse"]
    assert main([*base, "--operators", "sr:factor=2"]) == 0
    cli_error(capsys, [*base, "--operators", "denoise"], "other settings", "operators", "--overwrite")

    from guidance import DivergenceError

    def diverge(*args, **kwargs):
        raise DivergenceError("the iterate became NaN")

    monkeypatch.setattr("tasks.commands.restore.restore", diverge)
    assert main([*base, "--operators", "denoise", "--overwrite"]) == 0
    names = sorted(p.name for p in (out / "items").iterdir())
    assert names == ["a__denoise__pseudo_inverse.json"]  # the stale sr items are gone; nothing was measured
    summary = read_summary(out)
    assert summary["groups"][0]["diverged"] == 1 and summary["groups"][0]["psnr"] is None
    assert "Diverged: a__denoise__pseudo_inverse: the iterate became NaN" in (out / "summary.md").read_text()


# -- pieces --------------------------------------------------------------------------------------------------
def test_argument_helpers():
    assert split_operators(["sr:factor=2;gaussian_blur:sigma=1,kernel_size=5", " denoise ;"]) == [
        "sr:factor=2", "gaussian_blur:sigma=1,kernel_size=5", "denoise"]
    assert split_methods(["flair, dps", "flowchef"]) == ["flair", "dps", "flowchef"]
    assert parse_method_options(["flowchef.step_size=0.3", "flowchef.window=(0,1)", "flair.optimizer=adam"]) == {
        "flowchef": {"step_size": 0.3, "window": (0, 1)}, "flair": {"optimizer": "adam"}}
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_method_options(["step_size=0.3"])


def test_size_is_one_side_or_two_equal_numbers():
    """--size as generate and calibrate read it (one number: a square; H W), on the benchmark's square crops."""
    from tasks.commands.benchmark.arguments import square_side

    assert square_side(None) is None and square_side([32]) == 32 and square_side([32, 32]) == 32
    with pytest.raises(ValueError, match=r"to a square: give --size one side \(--size 48\), not 32 48"):
        square_side([32, 48])


def test_a_failed_process_stops_the_wait(tmp_path):
    item = benchmark._Item(1, "a", "sr:factor=2", "sr-factor-2", "dps", 0)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "rank1.failed").write_text("RuntimeError: CUDA out of memory\n")
    with pytest.raises(RuntimeError, match="process 1 stopped: RuntimeError: CUDA out of memory"):
        benchmark._wait_for(tmp_path, [(item, "f")], None, started=time.time() - 60, progress=False)


def test_bad_input(capsys, images, reference, tiny_sd3_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    out = tmp_path / "out"
    cli_error(capsys, arguments(tmp_path / "missing", tiny_sd3_folder, out), "does not exist", "--images")
    cli_error(capsys, arguments(empty, tiny_sd3_folder, out), "no images in", ".png")
    argv = arguments(images, tiny_sd3_folder, out)
    cli_error(capsys, [*argv, "--operators", "sr:factr=2"], "factr")
    cli_error(capsys, [*argv, "--operators", "gausian_blur"], "gaussian_blur")
    cli_error(capsys, [*argv, "--methods", "flowchf"], "did you mean", "flowchef")
    cli_error(capsys, [*argv, "--option", "flair.step_size=0.3"], "'flair'", "not among the methods")
    cli_error(capsys, [*argv, "--option", "flowchef.nope=1"], "nope")
    cli_error(capsys, [*argv, "--operators", "sr:factor=2"], "listed twice")
    cli_error(capsys, arguments(images, tiny_sd3_folder, out, "--size", "32", "48"), "to a square", "--size 48")
    cli_error(capsys, arguments(images, tiny_sd3_folder, out, "--size", "32", "32", "32"), "--size takes one number")
    assert not out.exists()  # nothing was written, the model was never loaded
    cli_error(capsys, [*arguments(images, tiny_sd3_folder, reference), "--steps", "3"],
              "other settings", "steps: 2 before, 3 now")
    cli_error(capsys, arguments(images, tiny_sd3_folder, reference, "--seed", "1"), "seed: 0 before, 1 now")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    cli_error(capsys, arguments(images, tiny_sd3_folder, foreign), "other files", "thesis.tex")
    cli_error(capsys, arguments(images, tiny_sd3_folder, out, "--size", "36"), "multiples of 8", "--size 40")
    cli_error(capsys, [*arguments(images, tiny_sd3_folder, out), "--operators", "sr:factor=3"],
              "does not fit 32x32")
