"""Every command through the real command line on the embedded default model (small crops, few steps)."""

import json
from pathlib import Path

import pytest

from guidance.backbones.default import DEFAULT_MODEL_DIR
from tasks.outputs.image_io import load_image, save_image

DEMOS = Path(__file__).resolve().parent.parent / "demos" / "images"


pytestmark = pytest.mark.usefixtures("offline_cache")


@pytest.fixture()
def crops(tmp_path):
    """Two 64x64 crops of held-out photos in a folder."""
    folder = tmp_path / "crops"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        save_image(load_image(DEMOS / f"{name}.png")[..., 96:160, 96:160], folder / f"{name}.png")
    return folder


def test_restore_on_the_default_model(crops, tmp_path, cli):
    code, out, err = cli("restore", crops / "chelsea.png", "--simulate", "--operator", "sr:factor=4,noise_std=0.01",
                         "--method", "flair", "--steps", 8, "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["settings"]["model"] == "default" and metrics["psnr"] > 22
    assert load_image(tmp_path / "out" / "restored.png").shape[-2:] == (64, 64)
    # the model's recommendation: pixel consistency on, stopped at the noise level (discrepancy principle)
    assert metrics["settings"]["consistency_steps"] == 100 and 0 < metrics["consistency_steps_taken"] < 100
    assert metrics["settings"]["options"]["data_steps"] == 3 and metrics["samples"] == 1


def test_restore_posterior_mean_without_consistency(crops, tmp_path, cli):
    code, out, err = cli("restore", crops / "coffee.png", "--simulate", "--operator", "sr:factor=4",
                         "--method", "pnp_flow", "--steps", 4, "--samples", 2, "--consistency-steps", 0,
                         "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["settings"]["samples"] == 2 and metrics["sample_std"] > 0
    assert metrics["settings"]["consistency_steps"] == 0 and "consistency_steps_taken" not in metrics
    code, out, err = cli("restore", crops / "coffee.png", "--simulate", "--operator", "jpeg:quality=30",
                         "--consistency-steps", 5, "--out", tmp_path / "jpeg", "--quiet")
    assert code != 0 and err.startswith("flowsteer: error: ") and len(err.strip().splitlines()) == 1
    assert "linear operator" in err and "--consistency-steps 0" in err
    assert not (tmp_path / "jpeg").exists()


def test_benchmark_and_calibrate_on_the_default_model(crops, tmp_path, cli):
    code, out, err = cli("benchmark", "--images", crops, "--operators", "inpaint_box:fraction=0.25",
                         "--methods", "flowchef,pnp_flow", "--steps", 4, "--out", tmp_path / "bench", "--quiet")
    assert code == 0, err
    assert len(list((tmp_path / "bench" / "items").glob("*.json"))) == 4  # 2 images x 1 operator x 2 methods
    assert "flowchef" in (tmp_path / "bench" / "summary.md").read_text()
    item = json.loads(next((tmp_path / "bench" / "items").glob("*flowchef*.json")).read_text())
    assert item["settings"]["consistency_steps"] == 100 and item["settings"]["samples"] == 1  # the model's advice
    code, out, err = cli("benchmark", "--images", crops, "--operators", "inpaint_box:fraction=0.25", "--methods",
                         "pnp_flow", "--steps", 2, "--limit", 1, "--samples", 2, "--consistency-steps", 0,
                         "--out", tmp_path / "mean", "--quiet")
    assert code == 0, err
    item = json.loads(next((tmp_path / "mean" / "items").glob("*.json")).read_text())
    assert item["settings"]["consistency_steps"] == 0 and item["settings"]["samples"] == 2
    # the same folder under another memory profile is another benchmark: refused, not mixed
    code, out, err = cli("benchmark", "--images", crops, "--operators", "inpaint_box:fraction=0.25", "--methods",
                         "pnp_flow", "--steps", 2, "--limit", 1, "--samples", 2, "--consistency-steps", 0,
                         "--memory", "balanced", "--out", tmp_path / "mean", "--quiet")
    assert code != 0 and "memory" in err and "--overwrite" in err, err
    code, out, err = cli("benchmark", "--images", crops, "--operators", "jpeg:quality=30", "--methods", "pnp_flow",
                         "--consistency-steps", 3, "--out", tmp_path / "jpeg", "--quiet")
    assert code != 0 and "linear operator" in err and not (tmp_path / "jpeg").exists()
    code, out, err = cli("calibrate", "--images", crops, "--points", 4, "--cache-dir", tmp_path / "crw",
                         "--quiet")
    assert code == 0, err
    assert len(list((tmp_path / "crw").glob("default-*-64x64.json"))) == 1


def test_generate_with_the_shipped_classifier(tmp_path, cli):
    code, out, err = cli("generate", "--classifier", DEFAULT_MODEL_DIR / "classifier", "--label", "retina",
                         "--num", 2, "--steps", 4, "--out", tmp_path / "gen", "--quiet")
    assert code == 0, err
    assert load_image(tmp_path / "gen" / "sample_0.png").shape[-2:] == (64, 64)


def test_edit_needs_a_text_model(crops, tmp_path, cli):
    save_image(load_image(crops / "chelsea.png") * 0 + 1, tmp_path / "mask.png")
    code, out, err = cli("edit", crops / "chelsea.png", "--mask", tmp_path / "mask.png", "--source-prompt",
                         "a cat", "--edit-prompt", "a dog", "--out", tmp_path / "edit", "--quiet")
    assert code == 2 and "takes no text" in err and "text-conditioned model" in err and "Traceback" not in err


def test_models_lists_the_default_as_installed(cli):
    code, out, err = cli("models", "--json")
    assert code == 0, err
    entry = next(m for m in json.loads(out) if m["source"] == "default")
    assert entry["status"] == "available"
