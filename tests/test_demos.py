"""Every demo runs once on the tiny SD3 folder (32x32, 3 steps), and each bundled example photo is what its README
says."""

import json
import runpy
from pathlib import Path

import pytest
from PIL import Image

DEMOS = Path(__file__).resolve().parents[1] / "demos"
TINY = ["--size", "32", "--steps", "3"]


def run_demo(name: str, argv: list[str]) -> None:
    runpy.run_path(str(DEMOS / f"{name}.py"))["main"](argv)


@pytest.mark.filterwarnings("ignore:no calibrated regularization weights")
def test_restore_demo(tiny_sd3_folder, tmp_path, capsys):
    run_demo("restore_image", ["--model", str(tiny_sd3_folder), *TINY, "--out", str(tmp_path / "grid.png")])
    assert "PSNR" in capsys.readouterr().out
    assert Image.open(tmp_path / "grid.png").width > 3 * 32


def test_guided_pipeline_demo(tiny_sd3_folder, tmp_path, capsys):
    run_demo("guided_pipeline", ["--model", str(tiny_sd3_folder), *TINY, "--out", str(tmp_path / "grid.png")])
    assert "flowchef: 3 NFE" in capsys.readouterr().out
    assert (tmp_path / "grid.png").is_file()


def test_edit_demo(tiny_sd3_folder, tmp_path):
    run_demo("edit_image", ["--model", str(tiny_sd3_folder), *TINY, "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["settings"]["method"] == "flowedit" and metrics["settings"]["height"] == 32
    assert metrics["nfe"] == 4  # n_max = round(3 * 33 / 50) = 2 FlowEdit steps, two velocities each
    assert (tmp_path / "edited.png").is_file() and (tmp_path / "grid.png").is_file()


def test_classifier_guidance_demo(tiny_sd3_folder, tmp_path, capsys):
    run_demo("classifier_guidance", ["--model", str(tiny_sd3_folder), *TINY, "--num", "1", "--out", str(tmp_path)])
    assert "p(blue) unguided" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["settings"]["label_name"] == "blue" and len(metrics["unguided_scores"]) == 1


def test_guided_pipeline_runs_on_the_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_demo("guided_pipeline", ["--size", "64", "--steps", "3", "--out", str(tmp_path / "grid.png")])
    with Image.open(tmp_path / "grid.png") as image:
        assert image.width >= 64 * 2


def test_example_photos_are_documented():
    folder = DEMOS / "images"
    photos = sorted(folder.glob("*.png"))
    readme = (folder / "README.md").read_text()
    assert len(photos) >= 5
    for photo in photos:
        assert f"`{photo.name}`" in readme
        assert photo.stat().st_size < 150_000
        with Image.open(photo) as image:
            assert image.size == (256, 256) and image.mode == "RGB"


@pytest.mark.parametrize("family", ["sd3", "flux2-klein", "qwen_image", "sana", "chroma"])
def test_sample_tiny_demo_loads_each_family_from_a_folder(family, tmp_path, capsys):
    run_demo("sample_tiny", ["--family", family, "--size", "64", "--steps", "2", "--out", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    adapter = {"sd3": "SD3Model", "flux2-klein": "Flux2Model", "qwen_image": "QwenImageModel", "sana": "SanaModel",
               "chroma": "ChromaModel"}[family]
    assert f"loaded {adapter}" in out and f"wrote {tmp_path / 'x.png'}" in out and (tmp_path / "x.png").is_file()
