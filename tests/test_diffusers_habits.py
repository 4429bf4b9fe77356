"""diffusers users' habits on flowsteer's front end: one argument set (diffusers' names, prompts, output_type
"latent", return_dict) for guidance.sample, every method and model(...); the pipelines' switches under their
diffusers names; images in any form for operators and MeasurementFidelity; torch_dtype="auto"; tasks.restore's
resize=; no empty "kept in float32" warning on a cast."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import NEGATIVE, PROMPT, sd3_pipeline

import tasks
from guidance import MeasurementFidelity, get_method, load_model, sample
from guidance.backbones.sd3 import SD3Model
from guidance.loading.images import check_output_type
from operators import as_operator, make_operator
from tasks import load_image
from tasks.studies.analytic_benchmark import smooth_image_prior

SEQ = 48  # FLUX's T5 tokens, small to keep the tests fast


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def default():
    return load_model("default")


def _photo(size=32, seed=0) -> Image.Image:
    coarse = torch.rand(1, 3, 4, 4, generator=_gen(seed))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)
    return Image.fromarray((smooth[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


# -- one argument set ------------------------------------------------------------------------------------------
def test_sample_methods_and_the_model_share_diffusers_names(default):
    small = dict(height=32, width=32, progress=False)
    reference = sample(default, num_steps=2, generator=_gen(1), **small)
    for result in (sample(default, num_inference_steps=2, generator=_gen(1), **small),
                   get_method("unguided")(default, None, num_inference_steps=2, generator=_gen(1), **small),
                   default(num_inference_steps=2, generator=_gen(1), **small)):
        assert torch.equal(result.x, reference.x)
    (images,) = sample(default, num_inference_steps=2, generator=_gen(1), return_dict=False, output_type="np",
                       **small)
    assert isinstance(images, np.ndarray) and images.shape == (1, 32, 32, 3)
    (pils,) = get_method("flowchef")(default, MeasurementFidelity("sr:factor=2", torch.zeros(1, 3, 16, 16)),
                                     num_steps=2, generator=_gen(1), return_dict=False, **small)
    assert isinstance(pils[0], Image.Image)

    latent = default(num_inference_steps=2, generator=_gen(1), output_type="latent", **small)
    assert latent.image is None and torch.equal(latent.images, reference.x)  # undecoded, as diffusers
    (x,) = get_method("unguided")(default, None, num_steps=2, generator=_gen(1), output_type="latent",
                                  return_dict=False, decode=True, **small)
    assert torch.equal(x, reference.x)

    for call in (lambda **kw: sample(default, **kw), lambda **kw: get_method("unguided")(default, None, **kw)):
        with pytest.raises(ValueError, match="takes no argument 'num_step': it takes .*num_steps.*diffusers'"):
            call(num_step=2, **small)
        with pytest.raises(ValueError, match="unconditional: it takes no prompt"):
            call(prompt="a cat", num_steps=2, **small)
        with pytest.raises(ValueError, match="same setting"):
            call(num_steps=2, num_inference_steps=2, **small)
        with pytest.raises(ValueError, match="return_dict must be True or False"):
            call(num_steps=2, return_dict="no", **small)
        with pytest.raises(ValueError, match="output_type must be one of 'pil', 'np', 'pt', 'latent', as "
                                             "diffusers names them, got 'jpg'"):
            call(num_steps=2, output_type="jpg", **small)
    with pytest.raises(ValueError, match="unconditional: it takes no prompt"):
        default("a cat", num_inference_steps=2, **small)


def test_a_text_free_model_samples_when_called_without_a_prompt():
    flow = smooth_image_prior(shape=(1, 4, 4), components=3)
    out = flow(generator=_gen(2), progress=False)           # its native size, 28 steps
    assert out.x.shape == (1, 1, 4, 4) and len(out.sigmas) == 29
    assert torch.equal(flow(num_inference_steps=8, generator=_gen(2), progress=False).x,
                       sample(flow, num_steps=8, generator=_gen(2), progress=False).x)
    with pytest.raises(ValueError, match="'AnalyticGMMFlow' is unconditional: it takes no prompt"):
        flow("a cat")


def test_prompts_go_through_the_adapters_condition(sd3, flux):
    small = dict(num_steps=2, height=32, width=32, progress=False)
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    reference = sample(sd3, cond, generator=_gen(3), **small)
    by_prompt = sample(sd3, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, generator=_gen(3), **small)
    assert torch.equal(by_prompt.x, reference.x)
    called = sd3(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, generator=_gen(3), output_type="latent",
                 **{k: v for k, v in small.items() if k != "num_steps"}, num_inference_steps=2)
    assert torch.equal(called.images, reference.x)
    plain = sd3.condition(PROMPT, guidance_scale=1.0)
    embedded = sample(sd3, prompt_embeds=plain.prompt_embeds, pooled_prompt_embeds=plain.pooled_prompt_embeds,
                      guidance_scale=1.0, generator=_gen(3), **small)
    assert torch.equal(embedded.x, sample(sd3, plain, generator=_gen(3), **small).x)
    batch = get_method("unguided")(sd3, None, prompt=[PROMPT, "a photo of a cat"], guidance_scale=1.0,
                                   num_images_per_prompt=2, generator=_gen(4), **small)
    assert batch.x.shape[0] == 4
    with pytest.raises(ValueError, match="give the condition once: cond= .* or the prompt arguments"):
        sample(sd3, cond, prompt=PROMPT, **small)
    with pytest.raises(ValueError, match="takes no argument 'promt': .*SD3Model.condition's .*prompt_embeds"):
        get_method("unguided")(sd3, None, promt=PROMPT, **small)

    flux_small = dict(num_steps=2, height=64, width=64, progress=False)
    flux_cond = flux.condition(PROMPT, guidance_scale=4.0, max_sequence_length=SEQ)
    assert torch.equal(sample(flux, prompt=PROMPT, guidance_scale=4.0, max_sequence_length=SEQ, generator=_gen(5),
                              **flux_small).x,
                       sample(flux, flux_cond, generator=_gen(5), **flux_small).x)


# -- the pipelines' switches -----------------------------------------------------------------------------------
def test_pipeline_switches_keep_their_diffusers_names(sd3, tmp_path, capsys):
    assert sd3.components["transformer"] is sd3.pipeline.transformer
    sd3.save_pretrained(tmp_path / "sd3")
    again = load_model(tmp_path / "sd3")
    assert isinstance(again, SD3Model)
    x = torch.randn(1, sd3.codec.latent_channels, 4, 4, generator=_gen(6))
    torch.testing.assert_close(again.velocity(x, 0.7, again.condition(PROMPT)),
                               sd3.velocity(x, 0.7, sd3.condition(PROMPT)))

    capsys.readouterr()
    sd3.set_progress_bar_config(disable=True)
    try:
        sample(sd3, num_steps=2, height=32, width=32, progress=True)
        assert "sampling" not in capsys.readouterr().err
    finally:
        sd3.set_progress_bar_config(disable=False)
    assert sd3.pipeline._progress_bar_config == {"disable": False}

    latents = torch.randn(2, sd3.codec.latent_channels, 4, 4, generator=_gen(7))
    whole = sd3.decode(latents)
    sd3.enable_vae_slicing()
    try:
        assert sd3.codec.autoencoder.use_slicing
        torch.testing.assert_close(sd3.decode(latents), whole, rtol=0, atol=1e-5)
    finally:
        sd3.disable_vae_slicing()
    with pytest.raises(ValueError, match="pixel-space model, with no autoencoder to slice"):
        smooth_image_prior(shape=(1, 4, 4), components=3).enable_vae_slicing()


def test_cpu_offload_is_refused_without_a_gpu_and_velocity_follows_an_offload(monkeypatch):
    model = SD3Model(sd3_pipeline())
    x = torch.randn(1, model.codec.latent_channels, 4, 4, generator=_gen(8))
    before = model.velocity(x, 0.6, model.condition(PROMPT, NEGATIVE, 5.0))
    with monkeypatch.context() as patch:  # a machine without a GPU, wherever this runs
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(torch.backends.mps, "is_available", lambda: False)
        with pytest.raises(ValueError, match="enable_model_cpu_offload .* there is no GPU here"):
            model.enable_model_cpu_offload()
    assert not getattr(model.pipeline, "_all_hooks", None)  # refused before diffusers touched the pipeline
    model.enable_model_cpu_offload(device="cpu")
    assert model.pipeline._all_hooks and model.device == torch.device("cpu", 0)
    torch.testing.assert_close(model.velocity(x, 0.6, model.condition(PROMPT, NEGATIVE, 5.0)), before)
    assert model.decode(x).shape == (1, 3, 32, 32)


def test_the_generic_model_saves_a_folder_that_loads_back(default, tmp_path):
    assert set(default.components) == {"unet", "vae", "scheduler"}
    assert default.components["unet"] is default.network
    folder = default.save_pretrained(tmp_path / "saved")
    again = load_model(folder)
    assert (again.timestep_scale, again.method_options, again.operator_options, again.restore_options,
            again.default_size, again.size_multiple) == (default.timestep_scale, default.method_options,
                                                         default.operator_options, default.restore_options,
                                                         default.default_size, default.size_multiple)
    assert (folder / "calibration").is_dir()
    x = torch.randn(1, 8, 8, 8, generator=_gen(9))
    torch.testing.assert_close(again.velocity(x, 0.5), default.velocity(x, 0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="writes diffusers components only"):
        type(default)(lambda x, t: x, channels=3).save_pretrained(tmp_path / "lambda")


# -- dtypes and casts ------------------------------------------------------------------------------------------
def test_torch_dtype_auto_reads_the_checkpoint_and_casts_say_nothing_empty(tmp_path):
    assert load_model("default", torch_dtype="auto").dtype == torch.float32  # stored in float32
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(handler)
    try:
        model = load_model("default").to(torch.bfloat16)
        assert not [m for m in messages if "kept in float32" in m]
        folder = model.save_pretrained(tmp_path / "bf16")
        assert load_model(folder, torch_dtype="auto").dtype == torch.bfloat16
        assert load_model(folder, dtype="AUTO", torch_dtype="auto").dtype == torch.bfloat16
        model.network.to(torch.float32)  # diffusers' own cast, outside flowsteer's, still says it
        assert [m for m in messages if "should be kept in float32: []" in m]
    finally:
        logger.removeHandler(handler)
    with pytest.raises(ValueError, match="disagree"):
        load_model("default", dtype=torch.bfloat16, torch_dtype="auto")


# -- images in any form ----------------------------------------------------------------------------------------
def test_operators_and_the_fidelity_take_pil_images_and_numpy_arrays():
    photo = _photo()
    tensor = load_image(photo)
    op = make_operator("gaussian_blur:kernel_size=5,sigma=1.0 | sr:factor=2", noise_std=0.05)
    for form in (photo, np.asarray(photo), np.asarray(photo).astype(np.float32) / 255):
        torch.testing.assert_close(op(form), op(tensor), rtol=0, atol=1e-6)
    torch.testing.assert_close(op.measure(photo, _gen(1)), op.measure(tensor, _gen(1)))
    grey = photo.convert("L")
    colorize = make_operator("colorize")
    torch.testing.assert_close(colorize(photo), colorize(tensor))
    fidelity = MeasurementFidelity(colorize, grey)  # a grey measurement stays one channel
    assert fidelity.y.shape == (1, 1, 32, 32)
    torch.testing.assert_close(fidelity.y, load_image(grey, channels=1))
    y = op(tensor)
    from_pil = MeasurementFidelity(op, Image.fromarray(((y[0] + 1) * 127.5).round().clamp(0, 255).byte()
                                                      .permute(1, 2, 0).numpy()))
    torch.testing.assert_close(from_pil.y, y, rtol=0, atol=1 / 127.5)
    values = np.array([[0.5, 3.0]], dtype=np.float64)  # a function's measurement: its values, not an image
    assert torch.equal(MeasurementFidelity(as_operator(lambda x: x.mean((2, 3))[:, :2]), values).y,
                       torch.tensor([[0.5, 3.0]]))
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got dict"):
        op({})


# -- output_type, tasks ----------------------------------------------------------------------------------------
def test_output_type_latent_is_refused_only_where_no_latent_is_kept(default):
    assert check_output_type("latent", latent=True) == "latent"
    with pytest.raises(ValueError, match="only guidance.sample and the methods keep; this result holds images"):
        check_output_type("latent")
    with pytest.raises(ValueError, match="holds images"):
        tasks.restore(default, torch.zeros(1, 3, 32, 32), "sr:factor=2", "unguided", simulate=True, num_steps=1,
                      output_type="latent", progress=False)


def test_restore_takes_resize_as_the_command_line_does(default):
    odd = _photo(36, seed=3)
    with pytest.raises(ValueError):
        tasks.restore(default, odd, "sr:factor=2", "unguided", simulate=True, num_steps=1, progress=False)
    out = tasks.restore(default, odd, "sr:factor=2", "unguided", simulate=True, num_steps=1, progress=False,
                        resize=True)
    assert out.restored.shape[-2:] == (32, 32) and out.reference.shape[-2:] == (32, 32)
    assert out.settings["resize"] is True and out.settings["input_size"] == [36, 36]
    measured = tasks.restore(default, np.zeros((18, 18, 3), np.uint8), "sr:factor=2", "unguided", num_steps=1,
                             progress=False, resize=True)
    assert measured.measurement.shape[-2:] == (16, 16) and measured.restored.shape[-2:] == (32, 32)
    with pytest.raises(ValueError, match="resize must be True or False"):
        tasks.restore(default, odd, "sr:factor=2", "unguided", resize="yes")
