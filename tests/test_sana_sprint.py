"""SANA-Sprint adapter against diffusers' SanaSprintPipeline (the oracle), with tiny offline components."""

import math

import pytest
import torch
from diffusers import SanaSprintPipeline

from guidance.backbones.sana import SanaCondition
from guidance.backbones.sana_sprint import SanaSprintModel, trigflow_to_flow
from guidance.sampler import sample
from tasks.random_models.common import NEGATIVE, PROMPT
from tasks.random_models.sana import tiny_sana_transformer
from tasks.random_models.sana_sprint import tiny_sana_sprint_pipeline

ATOL = 1e-5
SIZE = 64  # 2x2 latents (32x downsampling)
SEQ = 12
OTHER = "a white cat in the city"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _to_unit(image):
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sana_sprint_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return SanaSprintModel(pipe)


def _reference(pipe, prompt, steps, **call):
    common = dict(num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=SEQ,
                  use_resolution_binning=False, intermediate_timesteps=1.3 if steps == 2 else None, **call)
    latent = pipe(prompt, generator=_gen(), output_type="latent", **common).images
    image = pipe(prompt, generator=_gen(), output_type="pt", **common).images
    return latent, image


def _errors(out, latent, image):
    return (out.x - latent).abs().max().item(), (_to_unit(out.image) - image).abs().max().item()


@pytest.mark.parametrize(
    "prompt, call, batch_size",
    [(PROMPT, {}, None), ([PROMPT, OTHER], {}, None), (PROMPT, dict(num_images_per_prompt=2), 2),
     (PROMPT, dict(guidance_scale=7.0), None)],
    ids=["one-prompt", "two-prompts", "two-images-per-prompt", "guidance-7"],
)
def test_one_step_matches_pipeline(pipe, prompt, call, batch_size):
    """One step from pure noise (max_timesteps = pi/2): x0_hat = x - v equals the pipeline's denoised latent."""
    model = SanaSprintModel(pipe, max_timesteps=math.pi / 2)
    latent, image = _reference(pipe, prompt, 1, max_timesteps=math.pi / 2, **call)
    cond = model.condition(prompt, guidance_scale=call.get("guidance_scale"), max_sequence_length=SEQ)
    out = sample(model, cond, num_steps=1, height=SIZE, width=SIZE, generator=_gen(), batch_size=batch_size,
                 progress=False)
    assert out.x.shape == latent.shape and out.image.shape == image.shape
    assert max(_errors(out, latent, image)) <= ATOL


def test_one_step_default_angle_is_just_past_pure_noise(pipe, model):
    """The released first angle 1.57080 is 3.7e-6 past pi/2 (s_0 = 1.0000037, input scaled by as much); flowsteer
    starts at s = 1 and reads it as the pipeline's first level, so the default call is reproduced too."""
    assert trigflow_to_flow(torch.tensor(1.57080)).item() > 1 and model.sigmas(1)[0] == 1
    assert model.start_level().item() > 1
    latent, image = _reference(pipe, PROMPT, 1)
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    out = sample(model, cond, num_steps=1, height=SIZE, width=SIZE, generator=_gen(), progress=False)
    assert max(_errors(out, latent, image)) <= ATOL
    x = torch.randn(1, *model.latent_shape(SIZE, SIZE), generator=_gen(3))
    below = model.velocity(x, 1 - 1e-6, cond)  # just below pure noise: the plain transformer output
    assert (model.velocity(x, 1.0, cond) - below).abs().max() < 1e-4  # continuous up to the 3.7e-6 offset


@pytest.mark.parametrize("steps", [2, 3])
def test_consistency_sampling_matches_pipeline(pipe, model, steps):
    """With the SCM re-noising callbacks (the generator of the initial noise), several steps equal the pipeline."""
    latent, image = _reference(pipe, PROMPT, steps)
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    g = _gen()
    out = sample(model, cond, num_steps=steps, height=SIZE, width=SIZE, generator=g, progress=False,
                 **model.consistency_sampling(g))
    assert max(_errors(out, latent, image)) <= ATOL
    # flowsteer's own deterministic Euler steps on the same noise levels are another sampler
    euler = sample(model, cond, num_steps=steps, height=SIZE, width=SIZE, generator=_gen(), progress=False)
    assert (euler.x - latent).abs().max() > 1e-2


def test_euler_reuses_the_initial_noise(model):
    """From s = 1 the Euler step re-noises x0_hat with the initial noise itself: two Euler steps equal SCM
    sampling whose fresh noise is a second draw of the initial noise."""
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    euler = sample(model, cond, num_steps=2, height=SIZE, width=SIZE, generator=_gen(), progress=False, decode=False)
    scm = sample(model, cond, num_steps=2, height=SIZE, width=SIZE, generator=_gen(), progress=False, decode=False,
                 **model.consistency_sampling(_gen()))
    torch.testing.assert_close(euler.x, scm.x, rtol=0, atol=1e-5)


def test_schedule_maps_trigflow_angles(model):
    s = model.sigmas(2)
    expected = [1.0, math.sin(1.3) / (math.cos(1.3) + math.sin(1.3)), 0.0]
    torch.testing.assert_close(s, torch.tensor(expected), rtol=0, atol=1e-6)
    theta = torch.linspace(1.5708, 0, 5)
    torch.testing.assert_close(model.sigmas(4)[1:], torch.tan(theta[1:]) / (1 + torch.tan(theta[1:])),
                               rtol=0, atol=1e-6)
    assert torch.all(model.sigmas(4)[1:] < model.sigmas(4)[:-1])


def test_clean_estimate_is_the_trigflow_denoiser(pipe, model):
    """x - s v equals cos(theta) y - sin(theta) F_trig, the scheduler's pred_x0, on the TrigFlow state y."""
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    x = torch.randn(2, 8, 2, 2, generator=_gen(3))
    theta = torch.tensor(0.9)
    s = trigflow_to_flow(theta)
    v = model.velocity(x, s, cond)
    sd, r = 0.5, torch.sqrt(s ** 2 + (1 - s) ** 2)
    y = x / r * sd  # the pipeline's latents at angle theta
    f_trig = ((1 - 2 * s) * x + (1 - 2 * s + 2 * s ** 2) * v) / r * sd
    pred_x0 = (torch.cos(theta) * y - torch.sin(theta) * f_trig) / sd
    torch.testing.assert_close(x - s * v, pred_x0, rtol=0, atol=1e-5)


def test_guidance_embedding_changes_velocity(model):
    x = torch.randn(1, 8, 2, 2, generator=_gen())
    a = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=2.0, max_sequence_length=SEQ))
    b = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=6.0, max_sequence_length=SEQ))
    assert (a - b).abs().max() > 1e-5


def test_no_prompt_and_negative_prompt(pipe, model):
    """No prompt: "" without the instruction; a negative prompt has no effect and says so."""
    cond = model.condition(max_sequence_length=SEQ)
    latent, _ = _reference(pipe, "", 1, max_timesteps=math.pi / 2, complex_human_instruction=None)
    exact = SanaSprintModel(pipe, max_timesteps=math.pi / 2)
    out = sample(exact, cond, num_steps=1, height=SIZE, width=SIZE, generator=_gen(), progress=False, decode=False)
    assert (out.x - latent).abs().max() <= ATOL
    with pytest.warns(UserWarning, match="no classifier-free guidance"):
        negative = model.condition(PROMPT, NEGATIVE, max_sequence_length=SEQ)
    torch.testing.assert_close(negative.prompt_embeds, model.condition(PROMPT, max_sequence_length=SEQ).prompt_embeds)


def test_velocity_gradient_and_differentiable_codec(model):
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    x = torch.randn(1, 8, 2, 2, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, 0.5, cond).requires_grad
    model.velocity(x, 0.5, cond, grad=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    image = (torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1).requires_grad_(True)
    with torch.enable_grad():
        model.decode(model.encode(image)).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_noise_matches_pipeline_latents(pipe, model):
    """The pipeline draws (B, C, h, w) noise and scales it by sigma_data; the sampler's first state is the draw."""
    ref = pipe.prepare_latents(2, 8, SIZE, SIZE, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    sample(model, model.condition(PROMPT, max_sequence_length=SEQ), num_steps=1, height=SIZE, width=SIZE,
           generator=_gen(7), batch_size=2, progress=False, decode=False,
           callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(seen["x"], ref, rtol=0, atol=0)


# -- bad input ----------------------------------------------------------------------------------------------


def test_transformer_without_guidance_embedding_raises(pipe):
    plain = SanaSprintPipeline(**{**pipe.components, "transformer": tiny_sana_transformer(8, 16)})
    with pytest.raises(ValueError, match="use SanaModel"):
        SanaSprintModel(plain)


def test_bad_input_raises(model):
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="multiple of 32"):
        model.latent_shape(SIZE, 40)
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 16\)"):
        model.condition(prompt_embeds=torch.zeros(1, SEQ, 8))
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-2.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8, h, w\)"):
        model.velocity(torch.zeros(1, 8, 2), 0.5, model.condition(PROMPT, max_sequence_length=SEQ))
    with pytest.raises(TypeError, match="SanaSprintModel.condition"):
        model.velocity(torch.zeros(1, 8, 2, 2), 0.5, SanaCondition(cond.prompt_embeds, cond.prompt_attention_mask,
                                                                   None, None, 1.0))
