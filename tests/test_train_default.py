"""The training script of the default model runs every stage end to end (a few steps each) and writes a folder
that load_model reads, with its calibration table, classifiers and manifest."""

import json

import pytest
import torch

from guidance import load_model
from guidance.features.calibration import resolve_crw
from guidance.methods import get_method
from guidance.backbones.default import check_default_model
from tasks.default_model.train import HELD_OUT, TRAIN_PHOTOS, CropSampler, held_out_images, main


def test_held_out_photos_are_never_trained_on():
    assert not set(HELD_OUT) & set(TRAIN_PHOTOS) and "cat" not in TRAIN_PHOTOS  # cat is chelsea
    images = held_out_images()
    assert images.shape == (3 * len(HELD_OUT), 3, 256, 256) and images.min() >= -1 and images.max() <= 1


def test_crops_are_seeded_and_augmented():
    sampler = CropSampler({"astronaut": 1.0, "camera": 1.0}, size=32)
    a = sampler.sample(8, torch.Generator().manual_seed(0))
    b = sampler.sample(8, torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, sampler.sample(8, torch.Generator().manual_seed(1)))


@pytest.mark.slow
def test_every_stage_writes_a_loadable_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "model"
    main(["--out", str(out), "--threads", "1", "--autoencoder-steps", "2", "--decoder-steps", "2",
          "--flow-steps", "2", "--classifier-steps", "2", "--num-latents", "64", "--batch", "2",
          "--calibration-images", "2", "--calibration-size", "64"])
    check_default_model(out)  # every required file, hashes recorded
    log = json.loads((out / "training_log.json").read_text())
    assert set(log) == {"autoencoder", "decoder", "flow", "classifier", "judge", "calibration"}
    assert len(log["flow"]["loss"]) == 2 and log["autoencoder"]["evaluations"][-1]["step"] == 2
    model = load_model(str(out))
    vae = model.codec.autoencoder.config
    assert vae.scaling_factor == round(log["autoencoder"]["scaling_factor"], 5) and vae.scaling_factor > 0
    out_image = get_method("unguided")(model, None, num_steps=2, height=32, width=48,
                                       generator=torch.Generator().manual_seed(0), progress=False).image
    assert out_image.shape == (1, 3, 32, 48) and torch.isfinite(out_image).all()

    # the shipped calibration table is used for these weights only
    table, origin = resolve_crw(None, model, None, 64, 64, cache_dir=tmp_path / "empty_cache")
    assert origin == "shipped" and table.metadata["height"] == 64
    with torch.no_grad():
        next(model.network.parameters()).add_(1e-3)
    assert resolve_crw(None, model, None, 64, 64, cache_dir=tmp_path / "empty_cache")[1] == "default"
