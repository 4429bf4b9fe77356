"""The embedded default model: it loads offline through the generic adapter, restores held-out photos better than
the classical floor, ships its calibration and classifiers, and refuses damaged weights and prompts clearly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guidance import load_model
from guidance.methods import get_method
from guidance.backbones.default import DEFAULT_MODEL_DIR, DefaultModelError, check_default_model
from guidance.backbones.generic import GenericFlowModel
from guidance.objectives import MeasurementFidelity
from operators import make_operator
from tasks.outputs.image_io import load_image
from tasks.outputs.metrics import psnr
from guidance.features.rewards import load_classifier

DEMOS = Path(__file__).resolve().parent.parent / "demos" / "images"


pytestmark = pytest.mark.usefixtures("offline_cache")


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def held_out(size: int = 64) -> torch.Tensor:
    """A crop of the held-out chelsea photo (never trained on)."""
    image = load_image(DEMOS / "chelsea.png")
    top = (image.shape[-2] - size) // 2
    return image[..., top:top + size, 96:96 + size]


def test_loads_through_the_generic_adapter(model):
    assert isinstance(model, GenericFlowModel) and model.name_or_path == "default"
    assert (model.spatial_factor, model.size_multiple, model.default_size) == (4, 16, (64, 64))
    assert model.timestep_scale == 1000 and model.condition() is None
    sigmas = model.sigmas(10)
    assert sigmas.shape == (11,) and sigmas[0] == 1 and sigmas[-1] == 0
    weights = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*.safetensors"))
    assert weights <= 30 * 2**20


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (128, 96)])
def test_any_size_of_the_multiple(model, size):
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = model.encode(image)
    assert z.shape == (1, 8, size[0] // 4, size[1] // 4)
    v = model.velocity(torch.randn_like(z), 0.5)
    assert v.shape == z.shape and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="multiple of 16"):
        model.check_size(size[0] + 8, size[1])


def test_autoencoder_reconstructs_held_out_photos(model):
    image = load_image(DEMOS / "chelsea.png")
    with torch.no_grad():
        reconstruction = model.decode(model.encode(image)).clamp(-1, 1)
    assert float(psnr(reconstruction, image)) > 27.0


def test_prior_samples_look_like_images(model):
    """Unguided samples have the pixel statistics of photos (bounded, not noise): neighbouring pixels correlate."""
    out = get_method("unguided")(model, None, num_steps=12, height=64, width=64, batch_size=4,
                                 generator=torch.Generator().manual_seed(0), progress=False)
    x = out.image
    assert x.shape == (4, 3, 64, 64) and x.abs().max() < 1.5
    a, b = x[..., :, 1:].flatten(), x[..., :, :-1].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8


def test_flair_restores_a_held_out_crop(model):
    """SR x4 on a held-out crop: FLAIR with the shipped calibration table fits the measurement and lands far closer
    to the truth than an unguided sample (it does not yet beat bicubic: see the model card)."""
    x = held_out(64)
    operator = make_operator("sr:factor=4,noise_std=0.01")
    y = operator.measure(x, torch.Generator().manual_seed(0))
    out = get_method("flair")(model, MeasurementFidelity(operator, y), num_steps=12, height=64, width=64,
                              generator=torch.Generator().manual_seed(1), progress=False)
    assert out.info["crw_origin"] == "shipped"
    free = get_method("unguided")(model, None, num_steps=12, height=64, width=64,
                                  generator=torch.Generator().manual_seed(1), progress=False)
    restored, sample = out.image.clamp(-1, 1), free.image.clamp(-1, 1)
    assert float(psnr(restored, x)) > float(psnr(sample, x)) + 5
    residual = (operator(restored) - y).square().mean().sqrt()
    assert residual < 0.25 * (operator(sample) - y).square().mean().sqrt()
    bicubic = F.interpolate(y, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert float(psnr(restored, x)) > float(psnr(bicubic, x)) - 4  # the gap the model card reports, bounded


def test_classifiers_recognise_their_classes():
    from tasks.default_model.train import CLASSES, CropSampler

    photos = {photo: 1.0 for group in CLASSES.values() for photo in group}
    label_of = [i for i, group in enumerate(CLASSES.values()) for _ in group]
    x, index = CropSampler(photos).sample(64, torch.Generator().manual_seed(123), return_index=True)
    labels = torch.tensor(label_of)[index]
    for name in ("classifier", "judge"):
        classifier = load_classifier(str(DEFAULT_MODEL_DIR / name))
        assert classifier.names == list(CLASSES)
        with torch.no_grad():
            accuracy = (classifier.logits(x).argmax(1) == labels).float().mean()
        assert accuracy > 0.85, (name, float(accuracy))


# -- bad input ----------------------------------------------------------------------------------------------
def test_prompts_are_rejected(model, cli, tmp_path):
    with pytest.raises(ValueError, match="unconditional: it takes no prompt; drop --prompt"):
        model.condition("a cat")
    code, _, err = cli("restore", DEMOS / "chelsea.png", "--operator", "sr", "--simulate", "--prompt", "a cat",
                       "--out", tmp_path / "out", "--quiet", "--steps", 2)
    assert code == 2 and "takes no prompt" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "restored.png").exists()


@pytest.fixture()
def copy_of_default(offline_cache, tmp_path, monkeypatch):
    folder = tmp_path / "default_model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    monkeypatch.setenv("FLOWSTEER_DEFAULT_MODEL", str(folder))
    return folder


def test_damaged_weights_name_the_file_and_the_fix(copy_of_default):
    weights = copy_of_default / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a loadable file, but not the trained weights
    weights.write_bytes(bytes(data))
    with pytest.raises(DefaultModelError, match="damaged") as error:
        load_model("default")
    assert "unet/diffusion_pytorch_model.safetensors" in str(error.value)
    assert "pip install --force-reinstall" in str(error.value) and "tasks.default_model.train" in str(error.value)


def test_missing_weights_name_the_file_and_the_fix(cli, copy_of_default, tmp_path):
    (copy_of_default / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DefaultModelError, match="missing vae/diffusion_pytorch_model.safetensors"):
        check_default_model()
    code, _, err = cli("restore", DEMOS / "chelsea.png", "--operator", "sr", "--simulate", "--out", tmp_path / "out",
                       "--quiet")
    assert code != 0 and "tasks.default_model.train" in err and "Traceback" not in err


def test_manifest_covers_every_weight_file():
    recorded = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())["sha256"]
    shipped = {str(p.relative_to(DEFAULT_MODEL_DIR)).replace("\\", "/") for p in DEFAULT_MODEL_DIR.rglob("*.safetensors")}
    assert set(recorded) == shipped and {"unet/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors"} <= shipped


def test_recommended_options_per_method_and_operator_match_the_training_script(model):
    from tasks.default_model.train import OPERATOR_OPTIONS, RECOMMENDED_OPTIONS, RESTORE_OPTIONS

    assert (model.method_options, model.operator_options, model.restore_options) == (
        RECOMMENDED_OPTIONS, OPERATOR_OPTIONS, RESTORE_OPTIONS)
    early = {"step_size": 1.0, "normalize_step": True, "stop_sigma": 0.75}
    assert model.recommended_options("flowchef", "sr") == early
    assert model.recommended_options("flowchef", "gaussian_blur") == early
    assert model.recommended_options("flowchef", "inpaint_box") == {"step_size": 0.03}
    assert model.recommended_options("flowchef") == {"step_size": 0.03}
    assert model.recommended_options("pnp_flow", "sr") == {"step_size": 0.125, "normalize_step": True}
    assert model.recommended_options("unguided", "sr") == {}


def test_restore_applies_the_operators_recommendation_under_the_users_options(model):
    from operators import BicubicDownsampling, Composition
    from tasks.commands.restore import restore

    crop = held_out(32)
    run = dict(simulate=True, num_steps=4, progress=False, consistency_steps=0)
    by_spec = restore(model, crop, "sr:factor=4", "flowchef", **run)
    assert by_spec.settings["options"] == {"step_size": 1.0, "normalize_step": True, "stop_sigma": 0.75}
    by_object = restore(model, crop, BicubicDownsampling(factor=4), "flowchef", **run)
    torch.testing.assert_close(by_object.restored, by_spec.restored)
    user = restore(model, crop, "sr:factor=4", "flowchef", options={"step_size": 0.5}, **run)
    assert user.settings["options"]["step_size"] == 0.5 and user.settings["options"]["stop_sigma"] == 0.75
    inpaint = restore(model, crop, "inpaint_box", "flowchef", **run)
    assert inpaint.settings["options"] == {"step_size": 0.03}
    composed = restore(model, crop, Composition(["gaussian_blur", "sr:factor=2"]), "flowchef", **run)
    assert composed.settings["options"] == {"step_size": 0.03}  # nothing for "compose": the method's own
