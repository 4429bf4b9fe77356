"""diffusers' conventions on flowsteer's front end: images in any form, outputs as output_type, aliases, the
list of generators, on_step_end, a batch of restorations, a scale-free FlowChef step."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import NEGATIVE, PROMPT

import tasks
from guidance import AnalyticGMMFlow, CallableObjective, MeasurementFidelity, get_method, load_model, sample
from operators import make_operator
from tasks import load_image, save_image


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _smooth(size=32, seed=0, batch=1):
    coarse = torch.rand(batch, 3, 4, 4, generator=_gen(seed)) * 1.6 - 0.8
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(-1, 1)


@pytest.fixture(scope="module")
def default():
    return load_model("default")


def _prior() -> AnalyticGMMFlow:
    g = _gen(3)
    factors = torch.randn(2, 16, 16, generator=g, dtype=torch.float64) / 4
    covariances = factors @ factors.transpose(1, 2) + 0.05 * torch.eye(16, dtype=torch.float64)
    return AnalyticGMMFlow(torch.tensor([0.5, 0.5], dtype=torch.float64),
                           0.5 * torch.randn(2, 16, generator=g, dtype=torch.float64), covariances, (1, 4, 4))


# -- images in ------------------------------------------------------------------------------------------------
def test_an_image_is_taken_as_a_path_pil_image_numpy_array_or_tensor(tmp_path):
    x = _smooth()
    path = save_image(x, tmp_path / "x.png")
    from_path = load_image(path)
    pil = Image.open(path)
    array = np.array(pil)                       # uint8 (H, W, 3), as diffusers takes it
    for other in (load_image(pil), load_image(array), load_image(array.astype(np.float32) / 255),
                  load_image(from_path), load_image(from_path[0]), load_image(torch.from_numpy(array).permute(2, 0, 1))):
        torch.testing.assert_close(other, from_path, rtol=0, atol=1e-6)
    batch = load_image(np.stack([array, array]))
    assert batch.shape == (2, 3, 32, 32)
    assert load_image(array[..., 0], channels=3).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"taken in \[0, 1\]"):
        load_image(array.astype(np.float32))
    with pytest.raises(ValueError, match=r"taken in \[-1, 1\]"):
        load_image(torch.full((1, 3, 8, 8), 3.0))
    with pytest.raises(ValueError, match=r"no image was given \(None\)"):
        load_image(None)
    with pytest.raises(ValueError, match="cannot read an image from a dict"):
        load_image({})


def test_save_image_takes_a_batch_as_files_or_a_grid(tmp_path):
    batch = _smooth(batch=3)
    paths = save_image(batch, tmp_path / "out.png")
    assert [p.name for p in paths] == ["out-0.png", "out-1.png", "out-2.png"]
    for i, p in enumerate(paths):
        torch.testing.assert_close(load_image(p), batch[i:i + 1], rtol=0, atol=1 / 127)
    sheet = save_image(batch, tmp_path / "grid.png", grid=True)
    assert Image.open(sheet).width >= 3 * 32
    with pytest.raises(ValueError, match="NaN"):
        save_image(torch.full((2, 3, 8, 8), float("nan")), tmp_path / "bad.png")
    assert not list(tmp_path.glob("bad*"))


# -- outputs, aliases, generators -----------------------------------------------------------------------------
def test_methods_return_images_per_output_type_and_take_diffusers_names(default):
    run = get_method("unguided")
    out = run(default, None, num_inference_steps=2, height=32, width=32, generator=_gen(1), progress=False)
    same = run(default, None, num_steps=2, height=32, width=32, generator=_gen(1), progress=False,
               output_type="np")
    assert torch.equal(out.x, same.x)
    assert isinstance(out.images, list) and isinstance(out.images[0], Image.Image)  # "pil", diffusers' default
    assert out.images[0].size == (32, 32)
    array = same.images
    assert array.shape == (1, 32, 32, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    pt = run(default, None, num_steps=2, height=32, width=32, generator=_gen(1), progress=False, output_type="pt")
    torch.testing.assert_close(pt.images, (out.image.clamp(-1, 1) + 1) / 2)
    with pytest.raises(ValueError, match="output_type must be one of 'pil', 'np', 'pt'"):
        run(default, None, num_steps=2, output_type="jpg")
    with pytest.raises(ValueError, match="same setting"):
        run(default, None, num_steps=2, num_inference_steps=2)


def test_num_images_per_prompt_and_a_list_of_generators_set_the_batch(sd3):
    cond = sd3.condition([PROMPT, "a photo of a cat"], NEGATIVE, 5.0)
    out = get_method("unguided")(sd3, None, cond=cond, num_steps=2, height=32, width=32, num_images_per_prompt=2,
                                 generator=_gen(0), progress=False)
    assert out.x.shape[0] == 4
    generators = [_gen(5), _gen(6), _gen(7)]
    batch = sample(sd3, sd3.condition(PROMPT, NEGATIVE, 5.0), num_steps=2, height=32, width=32,
                   generator=generators, progress=False)
    assert batch.x.shape[0] == 3
    alone = sample(sd3, sd3.condition(PROMPT, NEGATIVE, 5.0), num_steps=2, height=32, width=32, generator=_gen(6),
                   progress=False)
    torch.testing.assert_close(batch.x[1:2], alone.x, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="both set the batch"):
        get_method("unguided")(sd3, None, num_steps=2, batch_size=2, num_images_per_prompt=2)


# -- on_step_end --------------------------------------------------------------------------------------
CASES = {"unguided": {}, "flowchef": {}, "flair": {"crw": 0.3}, "dps": {}, "pnp_flow": {}}


@pytest.mark.parametrize("method", list(CASES))
def test_on_step_end_sees_every_step_and_may_change_the_state(method):
    flow = _prior()
    op = make_operator("inpaint_box:fraction=0.25", noise_std=0.05)
    y = op.measure(_smooth(4, 7)[:, :1], _gen(8))
    method_run = get_method(method, **CASES[method])

    def run(*args, **kwargs):  # a fresh generator each time
        return method_run(*args, generator=_gen(9), **kwargs)

    common = dict(num_steps=4, progress=False)
    plain = run(flow, MeasurementFidelity(op, y), **common)
    steps = []

    def watch(step, sigma, state):
        steps.append(step)
        return state

    watched = run(flow, MeasurementFidelity(op, y), on_step_end=watch, **common)
    assert steps == [0, 1, 2, 3] and torch.equal(watched.x, plain.x)

    def zero_last(step, sigma, state):
        return {**state, "x": torch.zeros_like(state["x"])} if step == 3 else state

    changed = run(flow, MeasurementFidelity(op, y), on_step_end=zero_last, **common)
    assert torch.equal(changed.x, torch.zeros_like(changed.x))
    with pytest.raises(ValueError, match="must return the state dict"):
        run(flow, MeasurementFidelity(op, y), on_step_end=lambda step, sigma, state: None, **common)


# -- FlowChef without guessing the loss scale -----------------------------------------------------------------
def test_flowchef_normalize_grad_makes_the_step_independent_of_the_loss_scale(default):
    target = _smooth()

    def objective(scale):
        return CallableObjective(lambda x: scale * (x - target).square().flatten(1).mean(1), space="pixel")

    runs = [get_method("flowchef", step_size=0.05, normalize="grad")(
        default, objective(scale), num_steps=3, height=32, width=32, generator=_gen(2), progress=False)
        for scale in (1.0, 1000.0)]
    torch.testing.assert_close(runs[0].x, runs[1].x, rtol=1e-4, atol=1e-5)
    unguided = get_method("unguided")(default, None, num_steps=3, height=32, width=32, generator=_gen(2),
                                      progress=False)
    assert (runs[0].image - target).square().mean() < (unguided.image - target).square().mean()
    with pytest.raises(ValueError, match="normalize must be None or 'grad'"):
        get_method("flowchef", normalize="l2")(default, objective(1.0), num_steps=2)
    with pytest.raises(ValueError, match="already makes the step scale-free"):
        get_method("flowchef", normalize="grad", optimizer="adam")(default, objective(1.0), num_steps=2)


# -- restore: any image, a batch, images out ------------------------------------------------------------------
def test_restore_takes_a_batch_and_gives_each_image_what_it_gets_alone(default):
    batch = _smooth(batch=2, seed=4)
    common = dict(simulate=True, num_steps=2, progress=False, consistency_steps=5)
    both = tasks.restore(default, batch, "sr:factor=2,noise_std=0.01", "pnp_flow", **common)
    assert both.restored.shape == (2, 3, 32, 32) and len(both.metrics["per_image"]) == 2
    for i in range(2):
        alone = tasks.restore(default, batch[i:i + 1], "sr:factor=2,noise_std=0.01", "pnp_flow", **common)
        torch.testing.assert_close(both.restored[i:i + 1], alone.restored, rtol=0, atol=1e-4)
        assert abs(both.metrics["per_image"][i]["psnr"] - alone.metrics["psnr"]) < 0.01
    assert abs(both.metrics["psnr"] - sum(r["psnr"] for r in both.metrics["per_image"]) / 2) < 1e-9
    assert [im.size for im in both.images] == [(32, 32), (32, 32)]


def test_restore_takes_a_pil_image_and_a_numpy_reference(default, tmp_path):
    clean = _smooth(seed=6)
    pil = tasks.to_pil(clean)
    out = tasks.restore(default, pil, "sr:factor=2", "flowchef", simulate=True, num_inference_steps=2,
                        progress=False)
    assert out.settings["num_steps"] == 2 and out.restored.shape == (1, 3, 32, 32)
    measured = out.measurement
    again = tasks.restore(default, measured, "sr:factor=2", "flowchef", reference=np.asarray(pil), num_steps=2,
                          progress=False)
    assert "psnr" in again.metrics


def test_restore_records_an_operator_object_by_a_spec_that_rebuilds_it(default):
    from operators import make_operator as build

    op = build("gaussian_blur:sigma=1.5", noise_std=0.02)
    out = tasks.restore(default, _smooth(), op, "pnp_flow", simulate=True, num_steps=2, progress=False)
    rebuilt = build(out.settings["operator"])
    x = _smooth(seed=9)
    torch.testing.assert_close(rebuilt(x), op(x))
    assert rebuilt.noise_std == op.noise_std == out.settings["noise_std"]
    callable_op = tasks.restore(default, _smooth(), lambda x: x[..., ::2, ::2], "flowchef", simulate=True,
                                num_steps=2, progress=False)  # a plain callable is an operator too
    assert "not describable by a spec" in callable_op.settings["operator"]


def test_edit_takes_a_pil_image_and_a_numpy_mask_and_returns_images(tiny_sd3_folder):
    photo = tasks.to_pil(_smooth(seed=11))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255                                   # white = edit, as everywhere
    edited = tasks.edit(photo, mask, "a photo of a cat", "a photo of a dog", model=tiny_sd3_folder, num_steps=2,
                        progress=False, output_type="np")
    assert edited.images.shape == (1, 32, 32, 3) and float(edited.mask.sum()) == 16 * 16
    from guidance.methods.flowchef_edit import flowchef_edit
    from guidance.backbones.sd3 import SD3Model
    from tiny_models import sd3_pipeline

    model = SD3Model(sd3_pipeline())
    out = flowchef_edit(model, None, num_steps=2, source_image=photo, mask=torch.from_numpy(mask / 255.0).float(), step_size=0.01,
                        source_prompt="a photo of a cat", edit_prompt="a photo of a dog", progress=False)
    assert out.image.shape == (1, 3, 32, 32)


def test_generate_records_a_loaded_models_source_and_restore_grids_carry_the_psnr(default, tmp_path, monkeypatch):
    generation = tasks.generate(model=default, classifier="default", label="hubble", num=1, num_steps=2, height=32,
                                width=32, progress=False)
    assert generation.settings["model"] == "default" and generation.images[0].size == (32, 32)

    import tasks.commands.restore as restore_module

    seen = {}
    real = restore_module.save_grid

    def capture(path, rows, captions=None):
        seen["captions"] = captions
        return real(path, rows, captions)

    monkeypatch.setattr(restore_module, "save_grid", capture)
    from tasks import save_image

    photo = save_image(_smooth(seed=12), tmp_path / "photo.png")
    result = restore_module.restore_file(photo, "sr:factor=2", "pnp_flow", simulate=True, num_steps=2,
                                         out=tmp_path / "r", progress=False)
    assert seen["captions"][0][1] == f"pnp_flow\n{result.metrics['psnr']:.2f} dB"
    from PIL import Image

    assert Image.open(tmp_path / "r" / "grid.png").height >= 128  # cells of at least 128 px for 32x32 images
