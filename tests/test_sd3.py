"""SD3 / SD3.5 adapter against diffusers' StableDiffusion3Pipeline (the oracle), with tiny offline components."""

import pytest
import torch
from tiny_models import NEGATIVE, PROMPT, SD3_VAE_SCALE, SD3_VAE_SHIFT, sd3_pipeline, tiny_taesd

from guidance.backbones.sd3 import SD3Condition, SD3Model
from guidance.sampler import sample

ATOL = 1e-5
SIZE = 32


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _to_unit(image):
    """Our [-1, 1] images in the pipeline's output_type='pt' range [0, 1]."""
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize(
    "variant, guidance",
    [
        (dict(t5=True), 5.0),
        (dict(t5=False), 5.0),
        (dict(sd35=True, patch_size=2), 4.5),
        (dict(sd35="large", patch_size=2), 3.5),  # SD3.5-large: qk-norm, no dual attention
        (dict(t5=True), 1.0),  # CFG off: positive prompt only
    ],
    ids=["sd3-t5", "sd3-no-t5", "sd35", "sd35-large", "sd3-no-cfg"],
)
def test_matches_pipeline(variant, guidance):
    pipe = sd3_pipeline(**variant)
    common = dict(num_inference_steps=3, guidance_scale=guidance, height=SIZE, width=SIZE)
    ref_latent = pipe(PROMPT, negative_prompt=NEGATIVE, generator=_gen(), output_type="latent", **common).images
    ref_sigmas = pipe.scheduler.sigmas.clone()
    ref_image = pipe(PROMPT, negative_prompt=NEGATIVE, generator=_gen(), output_type="pt", **common).images

    model = SD3Model(pipe)
    cond = model.condition(PROMPT, NEGATIVE, guidance)
    out = sample(model, cond, num_steps=3, height=SIZE, width=SIZE, generator=_gen(), progress=False)

    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=1e-7)
    assert out.x.dtype == torch.float32 and out.x.shape == ref_latent.shape
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert out.image.shape == ref_image.shape
    assert (_to_unit(out.image) - ref_image).abs().max() <= ATOL


def test_schedule_is_the_shifted_checkpoint_schedule():
    model = SD3Model(sd3_pipeline())
    sigmas = model.sigmas(28)
    assert sigmas.shape == (29,) and sigmas[0] == 1 and sigmas[-1] == 0
    # static shift 3: s' = 3 s / (1 + 2 s); the last nonzero value is about 0.0089
    assert abs(sigmas[-2].item() - 0.0089) < 5e-4
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_batched_prompts_match_num_images_per_prompt():
    pipe = sd3_pipeline()
    prompts = [PROMPT, "a white cat in the city"]
    ref = pipe(
        prompts, negative_prompt=[NEGATIVE, ""], num_images_per_prompt=2, num_inference_steps=2, guidance_scale=5.0,
        height=SIZE, width=SIZE, generator=_gen(3), output_type="latent",
    ).images
    model = SD3Model(pipe)
    cond = model.condition(prompts, [NEGATIVE, ""], 5.0)
    out = sample(model, cond, num_steps=2, height=SIZE, width=SIZE, generator=_gen(3), batch_size=4,
                 progress=False, decode=False)
    assert out.image is None
    assert (out.x - ref).abs().max() <= ATOL


def test_condition_is_cached_and_reusable():
    model = SD3Model(sd3_pipeline())
    a = model.condition(PROMPT, NEGATIVE, 5.0)
    assert model.condition(PROMPT, NEGATIVE, 5.0) is a
    assert model.condition(PROMPT, NEGATIVE, 6.0) is not a
    assert a.prompt_embeds.shape == (1, 77 + 256, 32) and a.pooled_prompt_embeds.shape == (1, 64)
    no_cfg = model.condition(PROMPT, guidance_scale=1.0)
    assert not no_cfg.do_cfg and no_cfg.negative_prompt_embeds is None


def test_precomputed_embeddings_equal_prompt():
    model = SD3Model(sd3_pipeline())
    a = model.condition(PROMPT, NEGATIVE, 5.0)
    b = model.condition(
        prompt_embeds=a.prompt_embeds, pooled_prompt_embeds=a.pooled_prompt_embeds,
        negative_prompt_embeds=a.negative_prompt_embeds, negative_pooled_prompt_embeds=a.negative_pooled_prompt_embeds,
        guidance_scale=5.0,
    )
    x = torch.randn(1, 4, 4, 4, generator=_gen())
    torch.testing.assert_close(model.velocity(x, 0.7, a), model.velocity(x, 0.7, b), rtol=0, atol=0)


def test_velocity_gradient_only_when_asked():
    model = SD3Model(sd3_pipeline())
    cond = model.condition(PROMPT, NEGATIVE, 5.0)
    x = torch.randn(2, 4, 4, 4, generator=_gen(), requires_grad=True)
    v = model.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert not v.requires_grad
    v = model.velocity(x, torch.tensor([0.9, 0.4]), cond, grad=True)
    v.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_encode_decode_use_vae_scale_and_shift():
    pipe = sd3_pipeline()
    model = SD3Model(pipe)
    image = torch.rand(2, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    dist = pipe.vae.encode(image).latent_dist
    torch.testing.assert_close(model.encode(image), (dist.mean - SD3_VAE_SHIFT) * SD3_VAE_SCALE)
    sampled = (dist.sample(generator=_gen(5)) - SD3_VAE_SHIFT) * SD3_VAE_SCALE
    torch.testing.assert_close(model.encode(image, generator=_gen(5)), sampled)
    z = model.encode(image)
    assert z.shape == (2, *model.latent_shape(SIZE, SIZE)) == (2, 4, 4, 4)
    torch.testing.assert_close(model.decode(z), pipe.vae.decode(z / SD3_VAE_SCALE + SD3_VAE_SHIFT).sample)


def test_tiny_decoder_replaces_decode_only():
    pipe = sd3_pipeline()
    taesd = tiny_taesd()
    model = SD3Model(pipe, decoder=taesd)
    z = torch.randn(1, 4, 4, 4, generator=_gen())
    torch.testing.assert_close(model.decode(z), taesd.decode(z / SD3_VAE_SCALE + SD3_VAE_SHIFT).sample)
    image = torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    torch.testing.assert_close(model.encode(image), SD3Model(pipe).encode(image))


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_not_multiple_of_16_raises():
    model = SD3Model(sd3_pipeline(sd35=True, patch_size=2))  # VAE factor 8 x patch 2, as the released models
    assert model.size_multiple == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_shape(40, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        sample(model, model.condition(PROMPT), num_steps=2, height=32, width=24, progress=False)


def test_prompt_embeddings_of_wrong_shape_raise():
    model = SD3Model(sd3_pipeline())
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 32\)"):
        model.condition(prompt_embeds=torch.zeros(1, 10, 7), pooled_prompt_embeds=torch.zeros(1, 64))


def test_negative_guidance_scale_raises():
    model = SD3Model(sd3_pipeline())
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-1.0)


def test_image_with_wrong_channels_raises():
    model = SD3Model(sd3_pipeline())
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 4, SIZE, SIZE))


def test_foreign_condition_raises():
    model = SD3Model(sd3_pipeline())
    with pytest.raises(TypeError, match="SD3Model.condition"):
        model.velocity(torch.zeros(1, 4, 4, 4), 0.5, {"prompt": PROMPT})
    unconditional = model.condition()
    assert isinstance(unconditional, SD3Condition) and not unconditional.do_cfg  # "" against "" is skipped
