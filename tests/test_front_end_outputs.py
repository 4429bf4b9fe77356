"""What the front end writes: grids with visible cells (small images enlarged by pixel repetition), the PSNR under
each restored cell of the benchmark's grids, a design result that records its settings, and a benchmark summary
titled with the model's source."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.outputs import grid as tasks_grid
from tasks.outputs.image_io import load_image, save_image, to_pil

DEMOS = Path(__file__).resolve().parent.parent / "demos" / "images"


def _pixels(image: torch.Tensor) -> np.ndarray:
    return np.asarray(to_pil(image[0]))


# -- 1. grids --------------------------------------------------------------------------------------------------
def test_grid_cells_of_32px_images_are_128px_and_exact_pixel_repeats(tmp_path):
    generator = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    other = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    measurement = torch.rand(1, 1, 16, 16, generator=generator) * 2 - 1  # gray and smaller still
    path = tasks_grid.save_grid(tmp_path / "grid.png", [[measurement, small, other]],
                                [["sr", "flair\n27.31 dB", "reference"]])
    grid = np.asarray(Image.open(path).convert("RGB"))
    cell, padding = tasks_grid.MIN_CELL, 2
    assert cell >= 128 and grid.shape[1] == 3 * (cell + padding) + padding
    assert grid.shape[0] > cell + 2 * padding + 2 * 14  # room for the two caption lines
    for column, source in enumerate((measurement, small, other)):
        left = padding + column * (cell + padding)
        shown = grid[padding:padding + cell, left:left + cell]
        factor = cell // source.shape[-1]
        expected = _pixels(source.expand(-1, 3, -1, -1)).repeat(factor, 0).repeat(factor, 1)
        assert np.array_equal(shown, expected), column  # nearest neighbour: no blur, no shift
    # both caption lines are written (ink in each line's band under the method's cell)
    left = padding + cell + padding
    lines = grid[padding + cell:, left:left + cell].min(-1) < 128
    line = tasks_grid._line_height(tasks_grid._font())
    assert lines[1:1 + line].any() and lines[1 + line:1 + 2 * line].any()
    # no enlargement asked for: the old behaviour, cells the size of the largest image
    assert tasks_grid.image_grid([[small]], min_cell=0).size == (36, 36)
    with pytest.raises(ValueError, match="min_cell must be an integer >= 0"):
        tasks_grid.image_grid([[small]], min_cell=-1)


# -- 2. and 4. the benchmark on the default model --------------------------------------------------------------
@pytest.fixture(scope="module")
def default_bench(tmp_path_factory):
    """`flowsteer benchmark --model default ...` on one 32x32 photo, with the captions passed to save_grid."""
    from tasks.commands.cli import main

    root = tmp_path_factory.mktemp("front_end_bench")
    folder = root / "photos"
    folder.mkdir()
    save_image(load_image(DEMOS / "chelsea.png")[..., 96:160, 96:160], folder / "chelsea.png")
    captured = []
    original = tasks_grid.save_grid

    def capture(path, rows, captions=None, **kwargs):
        captured.append(captions)
        return original(path, rows, captions, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("FLOWSTEER_CACHE", str(root / "cache"))
        patch.delenv("FLOWSTEER_DEFAULT_MODEL", raising=False)
        patch.setattr(tasks_grid, "save_grid", capture)
        out = root / "bench"
        code = main(["benchmark", "--images", str(folder), "--operators", "sr:factor=2", "--methods",
                     "pseudo_inverse", "--model", "default", "--steps", "1", "--size", "32",
                     "--consistency-steps", "0", "--out", str(out), "--quiet"])
    assert code == 0
    return out, folder, captured


def test_benchmark_grid_captions_carry_each_methods_psnr(default_bench):
    out, _, captured = default_bench
    record = json.loads((out / "items" / "chelsea__sr-factor-2__pseudo_inverse.json").read_text())
    assert len(captured) == 1
    assert captured[0] == [["sr-factor-2", f"pseudo_inverse\n{record['psnr']:.2f} dB", "reference"]]
    grid = load_image(out / "grids" / "chelsea.png")
    assert grid.shape[-1] >= 3 * 128 and grid.shape[-2] >= 128 + 2 * 14  # 32x32 cells enlarged, 2 caption lines


def test_benchmark_summary_is_titled_with_the_model_source(default_bench, tmp_path):
    out, folder, _ = default_bench
    title = (out / "summary.md").read_text().splitlines()[0]
    assert title == "# Benchmark of pseudo_inverse on default"
    assert json.loads((out / "summary.json").read_text())["settings"]["model"] == "default"
    # a loaded model passed from Python is named by its source too, never by an object repr
    import tasks
    from guidance import load_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("FLOWSTEER_CACHE", str(tmp_path / "cache"))
        patch.delenv("FLOWSTEER_DEFAULT_MODEL", raising=False)
        result = tasks.benchmark(folder, "sr:factor=2", "pseudo_inverse", model=load_model("default"),
                                 out=tmp_path / "bench", num_steps=1, size=32, consistency_steps=0, progress=False)
    markdown = (result.out / "summary.md").read_text()
    assert markdown.splitlines()[0] == "# Benchmark of pseudo_inverse on default" and " object at 0x" not in markdown
    assert "object" not in result.summary["settings"]["model"]


# -- 3. design ------------------------------------------------------------------------------------------------
def test_design_json_records_every_setting_to_rerun_it(tmp_path, cli):
    out = tmp_path / "design.json"
    code, stdout, stderr = cli("design", "--flow", "analytic:length=8,components=2,seed=3", "--score", "motif:GAT",
                               "--alphabet", "ACGT", "--num", 6, "--steps", 5, "--gamma", 1.5, "--samples", 3,
                               "--source", "state", "--draw", "argmax", "--seed", 7, "--quiet", "--out", out)
    assert code == 0, stderr
    saved = json.loads(out.read_text())
    assert saved["settings"] == {"flow": "analytic:length=8,components=2,seed=3", "score": "motif:GAT",
                                 "alphabet": "ACGT", "num": 6, "steps": 5, "gamma": 1.5, "samples": 3,
                                 "source": "state", "draw": "argmax", "seed": 7, "method": "straight_through"}
    assert len(saved["sequences"]) == 6 and len(saved["curve"]) == 5
    # rerunning with the recorded settings gives the same sequences
    s = saved["settings"]
    again = tmp_path / "again.json"
    code, _, stderr = cli("design", "--flow", s["flow"], "--score", s["score"], "--alphabet", s["alphabet"],
                          "--num", s["num"], "--steps", s["steps"], "--gamma", s["gamma"], "--samples", s["samples"],
                          "--source", s["source"], "--draw", s["draw"], "--seed", s["seed"], "--quiet", "--out", again)
    assert code == 0, stderr
    assert json.loads(again.read_text())["sequences"] == saved["sequences"]
