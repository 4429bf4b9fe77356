"""SANA adapter against diffusers' SanaPipeline (the oracle), with tiny offline components."""

import pytest
import torch
from diffusers import SanaPipeline

from guidance.backbones.sana import SanaCondition, SanaModel
from guidance.sampler import sample
from tasks.random_models.common import NEGATIVE, PROMPT
from tasks.random_models.sana import SANA_VAE_SCALE, sana_scheduler, tiny_sana_pipeline

ATOL = 1e-5
SIZE = 64  # 2x2 latents (32x downsampling)
SEQ = 12  # the pipeline's max_sequence_length, small to keep the tests fast
STEPS = 3
OTHER = "a white cat in the city"  # as many words as PROMPT has not: masks differ
SAME_LENGTH = "a photo of a black dog running in the grass"  # as many tokens as PROMPT


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _to_unit(image):
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def pipe():
    """Euler scheduler with the released flow shift: the pipeline's update is flowsteer's."""
    return tiny_sana_pipeline("euler")


@pytest.fixture(scope="module")
def model(pipe):
    return SanaModel(pipe)


def _compare(pipe, model, prompt, call, cond_kw, batch_size=None, height=SIZE, width=SIZE):
    common = dict(num_inference_steps=STEPS, height=height, width=width, max_sequence_length=SEQ,
                  use_resolution_binning=False, **call)
    ref_latent = pipe(prompt, generator=_gen(), output_type="latent", **common).images
    ref_sigmas = pipe.scheduler.sigmas.clone()
    ref_image = pipe(prompt, generator=_gen(), output_type="pt", **common).images
    cond = model.condition(prompt, max_sequence_length=SEQ, **cond_kw)
    out = sample(model, cond, num_steps=STEPS, height=height, width=width, generator=_gen(), batch_size=batch_size,
                 progress=False)
    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=1e-7)
    assert out.x.dtype == torch.float32 and out.x.shape == ref_latent.shape
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert out.image.shape == ref_image.shape
    assert (_to_unit(out.image) - ref_image).abs().max() <= ATOL
    return cond


@pytest.mark.parametrize(
    "call, cond_kw, do_cfg",
    [
        (dict(negative_prompt=NEGATIVE, guidance_scale=4.5), dict(negative_prompt=NEGATIVE, guidance_scale=4.5), True),
        (dict(guidance_scale=3.0), dict(guidance_scale=3.0), True),  # the default negative prompt ""
        (dict(guidance_scale=1.0), dict(guidance_scale=1.0), False),  # CFG off: positive prompt only
        (dict(negative_prompt=NEGATIVE, guidance_scale=4.5, complex_human_instruction=None),
         dict(negative_prompt=NEGATIVE, guidance_scale=4.5, complex_human_instruction=None), True),
    ],
    ids=["cfg-negative", "cfg-empty-negative", "no-cfg", "no-instruction"],
)
def test_matches_pipeline(pipe, model, call, cond_kw, do_cfg):
    cond = _compare(pipe, model, PROMPT, call, cond_kw)
    assert cond.do_cfg == do_cfg and (cond.negative_prompt_embeds is not None) == do_cfg


def test_non_square_matches_pipeline(pipe, model):
    _compare(pipe, model, PROMPT, dict(negative_prompt=NEGATIVE), dict(negative_prompt=NEGATIVE), height=64,
             width=128)


def test_batched_prompts_match_pipeline(pipe, model):
    cond = _compare(pipe, model, [PROMPT, OTHER], dict(negative_prompt=[NEGATIVE, ""]),
                    dict(negative_prompt=[NEGATIVE, ""]))
    assert cond.batch_size == 2
    assert not torch.equal(cond.prompt_attention_mask[0], cond.prompt_attention_mask[1])


def test_images_per_prompt_match_pipeline(pipe, model):
    _compare(pipe, model, PROMPT, dict(negative_prompt=NEGATIVE, num_images_per_prompt=2),
             dict(negative_prompt=NEGATIVE), batch_size=2)
    # two prompts with two images each (prompts with equal masks: diffusers orders several prompts' masks
    # differently from their embeddings, see the module docstring)
    cond = _compare(pipe, model, [PROMPT, SAME_LENGTH], dict(num_images_per_prompt=2), {}, batch_size=4)
    assert torch.equal(cond.prompt_attention_mask[0], cond.prompt_attention_mask[1])


def test_no_text_is_the_unconditional_branch(pipe, model):
    """No prompt: "" without the instruction, no CFG, as the pipeline's negative branch."""
    cond = model.condition(max_sequence_length=SEQ)
    assert not cond.do_cfg
    common = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, max_sequence_length=SEQ,
                  use_resolution_binning=False, guidance_scale=1.0, complex_human_instruction=None)
    ref = pipe("", generator=_gen(), output_type="latent", **common).images
    out = sample(model, cond, num_steps=STEPS, height=SIZE, width=SIZE, generator=_gen(), progress=False, decode=False)
    assert (out.x - ref).abs().max() <= ATOL
    assert not torch.allclose(cond.prompt_embeds, model.condition("", max_sequence_length=SEQ).prompt_embeds)


def test_instruction_and_token_selection(model):
    """The instruction changes the prompt's embedding; the kept tokens are <bos> and the last SEQ - 1 of
    instruction + prompt + padding (instruction tokens + SEQ - 2 in all): the instruction's last token, ":", stays."""
    with_chi = model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ)
    plain = model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ, complex_human_instruction=None)
    assert with_chi.prompt_embeds.shape == plain.prompt_embeds.shape == (1, SEQ, 16)
    assert not torch.allclose(with_chi.prompt_embeds, plain.prompt_embeds)
    # PROMPT has 10 words: <bos> + 10 tokens + 1 pad without the instruction; <bos> + ":" + 10 tokens with it
    assert plain.prompt_attention_mask.tolist() == [[1] * 11 + [0]]
    assert with_chi.prompt_attention_mask.tolist() == [[1] * 12]


def test_cfg_combines_one_batched_call(model):
    x = torch.randn(2, 8, 2, 2, generator=_gen())
    cond = model.condition(PROMPT, NEGATIVE, 3.0, max_sequence_length=SEQ)
    pos = SanaCondition(cond.prompt_embeds, cond.prompt_attention_mask, None, None, 1.0)
    neg = SanaCondition(cond.negative_prompt_embeds, cond.negative_prompt_attention_mask, None, None, 1.0)
    v_c, v_u = model.velocity(x, 0.7, pos), model.velocity(x, 0.7, neg)
    assert (v_c - v_u).abs().max() > 1e-4
    torch.testing.assert_close(model.velocity(x, 0.7, cond), v_u + 3.0 * (v_c - v_u), rtol=0, atol=1e-5)
    off = model.condition(PROMPT, NEGATIVE, 1.0, max_sequence_length=SEQ)
    assert off.negative_prompt_embeds is None
    torch.testing.assert_close(model.velocity(x, 0.7, off), v_c, rtol=0, atol=1e-6)


def test_released_dpm_scheduler_sigmas(pipe):
    """With the released DPM-Solver scheduler the sigmas are its flow sigmas (flowsteer steps Euler on them)."""
    dpm = SanaPipeline(**{**pipe.components, "scheduler": sana_scheduler("dpm")})
    dpm.set_progress_bar_config(disable=True)
    model = SanaModel(dpm)
    dpm(PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, max_sequence_length=SEQ, output_type="latent",
        use_resolution_binning=False, generator=_gen())
    torch.testing.assert_close(model.sigmas(4), dpm.scheduler.sigmas.float(), rtol=0, atol=0)
    # flow sigmas: 1 - linspace(1, 1/1000, N + 1), shifted by 3, the final one dropped, then a 0
    s = 1 - torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)
    shifted = (3 * s / (1 + 2 * s)).flip(0)[:-1]
    torch.testing.assert_close(model.sigmas(4)[:-1].double(), shifted, rtol=0, atol=1e-6)
    assert model.sigmas(4)[-1] == 0


def test_noise_matches_pipeline_latents(pipe, model):
    ref = pipe.prepare_latents(2, 8, SIZE, SIZE, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    sample(model, model.condition(PROMPT, max_sequence_length=SEQ), num_steps=1, height=SIZE, width=SIZE,
           generator=_gen(7), batch_size=2, progress=False, decode=False,
           callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(seen["x"], ref, rtol=0, atol=0)


def test_encode_decode_use_dc_ae_scaling(pipe, model):
    assert model.spatial_factor == pipe.vae_scale_factor == 32 and model.size_multiple == 32
    image = torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    z = model.encode(image)
    assert z.shape == (1, 8, 2, 2)
    torch.testing.assert_close(z, pipe.vae.encode(image).latent * SANA_VAE_SCALE)
    torch.testing.assert_close(model.decode(z), pipe.vae.decode(z / SANA_VAE_SCALE).sample)
    # differentiable when the caller enables gradients
    image.requires_grad_(True)
    with torch.enable_grad():
        model.decode(model.encode(image)).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_velocity_gradient_when_asked(model):
    cond = model.condition(PROMPT, NEGATIVE, max_sequence_length=SEQ)
    x = torch.randn(1, 8, 2, 2, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, 0.5, cond).requires_grad
    model.velocity(x, 0.5, cond, grad=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_precomputed_embeddings_match_prompt(model):
    cond = model.condition(PROMPT, NEGATIVE, 4.5, max_sequence_length=SEQ)
    again = model.condition(prompt_embeds=cond.prompt_embeds, prompt_attention_mask=cond.prompt_attention_mask,
                            negative_prompt=NEGATIVE, guidance_scale=4.5)
    torch.testing.assert_close(again.negative_prompt_embeds, cond.negative_prompt_embeds, rtol=0, atol=0)
    x = torch.randn(1, 8, 2, 2, generator=_gen())
    torch.testing.assert_close(model.velocity(x, 0.4, again), model.velocity(x, 0.4, cond), rtol=0, atol=0)


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_not_multiple_of_32_raises(model):
    with pytest.raises(ValueError, match="multiple of 32"):
        model.latent_shape(SIZE, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        model.sigmas(4, 80, SIZE)


def test_latent_of_wrong_shape_raises(model):
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8, h, w\)"):
        model.velocity(torch.zeros(1, 4, 2, 2), 0.5, model.condition(PROMPT, max_sequence_length=SEQ))


def test_prompt_embeddings_of_wrong_shape_raise(model):
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 16\)"):
        model.condition(prompt_embeds=torch.zeros(1, SEQ, 32))
    with pytest.raises(ValueError, match=r"prompt_attention_mask must have shape \(1, 12\)"):
        model.condition(prompt_embeds=torch.zeros(1, SEQ, 16), prompt_attention_mask=torch.ones(1, 5))


def test_negative_guidance_scale_raises(model):
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-1.0)


def test_image_with_wrong_channels_raises(model):
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, SIZE, SIZE))


def test_from_components_and_dc_ae_tiling(pipe):
    model = SanaModel.from_components(**pipe.components)
    assert model.default_size == (1024, 1024) and model.max_size is None
    model.enable_vae_tiling(128, 0.25)  # 4 latent pixels, one shared: a 96-pixel stride
    assert pipe.vae.use_tiling and pipe.vae.tile_sample_min_height == 128 and pipe.vae.tile_sample_stride_height == 96
    assert model.encode(torch.zeros(1, 3, 128, 128)).shape == (1, 8, 4, 4)
    model.disable_vae_tiling()
    assert not pipe.vae.use_tiling
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of the autoencoder's factor 32"):
        model.enable_vae_tiling(48)
