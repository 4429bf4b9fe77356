"""FLUX.2 [dev] / [klein] adapter against diffusers' Flux2Pipeline and Flux2KleinPipeline (the oracles), with tiny
offline components."""

import math

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from tiny_models import NEGATIVE, PROMPT, parameter_count

from guidance.backbones.flux2 import (
    Flux2Condition,
    Flux2Model,
    latent_ids,
    pack_tokens,
    patchify,
    text_ids,
    unpack_tokens,
    unpatchify,
)
from guidance.sampler import sample
from tasks.random_models.flux2 import flux2_klein_components, flux2_klein_transformer, flux2_vae, tiny_flux2_pipeline

ATOL = 1e-5
SIZE = 32  # 2x2 latent tokens of 16 channels
SEQ = 64  # text tokens (the pipelines' max_sequence_length), small to keep the tests fast
OTHER = "a green tree in the city"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _to_unit(image):
    """Our [-1, 1] images in the pipeline's output_type='pt' range [0, 1]."""
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def dev():
    return tiny_flux2_pipeline("dev")


@pytest.fixture(scope="module")
def klein():
    return tiny_flux2_pipeline("klein")


@pytest.fixture(scope="module")
def klein_distilled():
    return tiny_flux2_pipeline("klein", distilled=True)


def _pipeline_latent(model, latents, size):
    """The pipeline's output_type='latent' result in our layout: dev returns the normalised tokens, klein the
    denormalised, unpatchified VAE latent."""
    if latents.ndim == 3:
        return unpack_tokens(latents, size // 16, size // 16)
    mean, std = model.codec.statistics("cpu", torch.float32)
    return (patchify(latents) - mean) / std


CASES = {
    # name: (pipeline, prompt, negative, guidance_scale, num_images_per_prompt, size, steps, expect_cfg)
    "dev": ("dev", PROMPT, None, 3.0, 1, SIZE, 3, False),
    "dev-64px": ("dev", PROMPT, None, 5.0, 1, 64, 2, False),
    "dev-two-prompts": ("dev", [PROMPT, OTHER], None, 4.0, 1, SIZE, 2, False),
    "dev-two-per-prompt": ("dev", PROMPT, None, 4.0, 2, SIZE, 2, False),
    "klein-cfg-negative": ("klein", PROMPT, NEGATIVE, 4.0, 1, SIZE, 3, True),
    "klein-cfg-empty-negative": ("klein", PROMPT, None, 3.5, 1, 64, 2, True),
    "klein-cfg-off": ("klein", PROMPT, NEGATIVE, 1.0, 1, SIZE, 3, False),
    "klein-two-prompts-cfg": ("klein", [PROMPT, OTHER], [NEGATIVE, ""], 4.0, 1, SIZE, 2, True),
    "klein-two-per-prompt-cfg": ("klein", PROMPT, NEGATIVE, 4.0, 2, SIZE, 2, True),
    "klein-distilled": ("klein_distilled", PROMPT, None, 4.0, 1, SIZE, 2, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pipeline(case, request):
    kind, prompt, negative, guidance, per_prompt, size, steps, expect_cfg = CASES[case]
    pipe = request.getfixturevalue(kind)
    call = dict(num_inference_steps=steps, height=size, width=size, max_sequence_length=SEQ,
                guidance_scale=guidance, num_images_per_prompt=per_prompt)
    if negative is not None:  # the klein pipeline takes negatives as embeddings only (its default is "")
        call["negative_prompt_embeds"] = pipe.encode_prompt(negative, device="cpu", max_sequence_length=SEQ)[0]
    latents = pipe(prompt=prompt, generator=_gen(), output_type="latent", **call).images
    ref_sigmas = pipe.scheduler.sigmas.clone()
    ref_image = pipe(prompt=prompt, generator=_gen(), output_type="pt", **call).images

    model = Flux2Model(pipe)
    cond = model.condition(prompt, negative, guidance, max_sequence_length=SEQ)
    assert cond.do_cfg == expect_cfg
    n = 1 if isinstance(prompt, str) else len(prompt)
    out = sample(model, cond, num_steps=steps, height=size, width=size, generator=_gen(),
                 batch_size=n * per_prompt, progress=False)

    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=1e-7)
    assert out.x.dtype == torch.float32 and out.x.shape == (n * per_prompt, 16, size // 16, size // 16)
    assert (out.x - _pipeline_latent(model, latents, size)).abs().max() <= ATOL
    assert out.image.shape == ref_image.shape == (n * per_prompt, 3, size, size)
    assert (_to_unit(out.image) - ref_image).abs().max() <= ATOL


def test_noise_is_the_pipeline_draw(klein):
    """The pipeline draws (B, 4C, h, w) noise and packs it into tokens; the sampler's first state is that noise."""
    packed, ids = klein.prepare_latents(2, 4, 64, 64, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    model = Flux2Model(klein)
    sample(model, model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ), num_steps=1, height=64,
           width=64, generator=_gen(7), batch_size=2, progress=False, decode=False,
           callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(pack_tokens(seen["x"]), packed, rtol=0, atol=0)
    torch.testing.assert_close(latent_ids(4, 4), ids[0], rtol=0, atol=0)


def test_layouts_match_pipeline_helpers(dev):
    x = torch.randn(2, 3, 6, 10, generator=_gen())
    torch.testing.assert_close(patchify(x), dev._patchify_latents(x), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(x)), x, rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(x.repeat(1, 4, 1, 1)), dev._unpatchify_latents(x.repeat(1, 4, 1, 1)))
    tokens = pack_tokens(x)
    torch.testing.assert_close(tokens, dev._pack_latents(x), rtol=0, atol=0)
    torch.testing.assert_close(unpack_tokens(tokens, 6, 10), x, rtol=0, atol=0)
    torch.testing.assert_close(latent_ids(6, 10), dev._prepare_latent_ids(x)[1], rtol=0, atol=0)
    torch.testing.assert_close(text_ids(5), dev._prepare_text_ids(torch.zeros(1, 5, 8))[0], rtol=0, atol=0)


def test_schedule_follows_the_empirical_mu(dev):
    """mu depends on the token count and on the step count: s' = e^mu / (e^mu + 1/s - 1)."""
    model = Flux2Model(dev)
    for steps in (4, 28):
        sigmas = model.sigmas(steps, 1024, 1024)  # 64 x 64 tokens
        mu = compute_empirical_mu(4096, steps)
        s = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
        expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
        torch.testing.assert_close(sigmas[:-1].double(), expected, rtol=0, atol=1e-6)
    assert compute_empirical_mu(4096, 4) != compute_empirical_mu(4096, 28)
    assert model.default_size == (1024, 1024) and model.spatial_factor == 16
    assert model.latent_shape(1024, 512) == (16, 64, 32)


def test_encode_decode_use_the_batch_norm_statistics(klein):
    model = Flux2Model(klein)
    vae = klein.vae
    assert not torch.allclose(vae.bn.running_mean, torch.zeros_like(vae.bn.running_mean))  # exercised
    image = torch.rand(2, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    z = model.encode(image)
    torch.testing.assert_close(z, klein._encode_vae_image(image, None))  # the pipeline's own image encoding
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    raw = klein._unpatchify_latents(z * std + vae.bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(model.decode(z), vae.decode(raw).sample)
    sampled = model.encode(image, generator=_gen(1))
    assert sampled.shape == z.shape and not torch.allclose(sampled, z)


def test_encode_and_decode_are_differentiable(dev):
    model = Flux2Model(dev)
    image = (torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1).requires_grad_(True)
    with torch.enable_grad():
        model.decode(model.encode(image)).square().mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_velocity_gradient_when_asked(kind, request):
    model = Flux2Model(request.getfixturevalue(kind))
    cond = model.condition(PROMPT, None, 4.0, max_sequence_length=SEQ)
    assert cond.do_cfg == (kind == "klein")
    x = torch.randn(2, 16, 2, 2, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, 0.5, cond).requires_grad
    v = model.velocity(x, torch.tensor([0.3, 0.8]), cond, grad=True)
    assert v.dtype == torch.float32 and v.shape == x.shape
    v.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_klein_cfg_is_the_combination_of_two_calls(klein):
    model = Flux2Model(klein)
    pos = model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ).prompt_embeds
    neg = model.condition(NEGATIVE, guidance_scale=1.0, max_sequence_length=SEQ).prompt_embeds
    x = torch.randn(1, 16, 2, 2, generator=_gen())
    v_c = model.velocity(x, 0.7, Flux2Condition(pos))
    v_u = model.velocity(x, 0.7, Flux2Condition(neg))
    guided = model.velocity(x, 0.7, model.condition(PROMPT, NEGATIVE, 3.0, max_sequence_length=SEQ))
    torch.testing.assert_close(guided, v_u + 3.0 * (v_c - v_u), rtol=0, atol=1e-5)
    assert (guided - v_c).abs().max() > 1e-4


def test_cfg_switches(klein, klein_distilled, dev):
    kl, kd, dv = Flux2Model(klein), Flux2Model(klein_distilled), Flux2Model(dev)
    assert kl.condition(PROMPT, NEGATIVE, 4.0, max_sequence_length=SEQ).do_cfg
    assert not kl.condition(PROMPT, NEGATIVE, 1.0, max_sequence_length=SEQ).do_cfg
    assert not kl.condition(guidance_scale=4.0, max_sequence_length=SEQ).do_cfg  # no text: both halves empty
    assert not kd.condition(PROMPT, None, 4.0, max_sequence_length=SEQ).do_cfg
    assert not dv.condition(PROMPT, None, 4.0, max_sequence_length=SEQ).do_cfg
    assert dv.condition(PROMPT, "", 2.0, max_sequence_length=SEQ).guidance == 2.0  # empty negative: accepted
    with pytest.raises(ValueError, match="guidance-distilled and takes no negative prompt"):
        dv.condition(PROMPT, NEGATIVE, 4.0)
    with pytest.raises(ValueError, match="step-distilled and takes no negative prompt"):
        kd.condition(PROMPT, NEGATIVE, 4.0)


def test_guidance_embedding_changes_dev_velocity(dev):
    model = Flux2Model(dev)
    x = torch.randn(1, 16, 2, 2, generator=_gen())
    a = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=2.0, max_sequence_length=SEQ))
    b = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=6.0, max_sequence_length=SEQ))
    assert (a - b).abs().max() > 1e-6


def test_prompts_give_different_embeddings_and_are_cached(klein):
    model = Flux2Model(klein)
    cond = model.condition([PROMPT, OTHER], guidance_scale=1.0, max_sequence_length=SEQ)
    assert cond.batch_size == 2 and not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])
    assert model.condition([PROMPT, OTHER], guidance_scale=1.0, max_sequence_length=SEQ) is cond
    from_embeds = model.condition(None, NEGATIVE, 4.0, prompt_embeds=cond.prompt_embeds, max_sequence_length=SEQ)
    assert from_embeds.do_cfg and from_embeds.negative_prompt_embeds.shape == cond.prompt_embeds.shape


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_not_multiple_of_16_raises(dev):
    model = Flux2Model(dev)
    assert model.size_multiple == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_shape(SIZE, 40)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.sigmas(4, 24, SIZE)


def test_embeddings_of_wrong_shape_raise(klein):
    model = Flux2Model(klein)
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 48\)"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 32))
    with pytest.raises(ValueError, match="must have the shape of prompt_embeds"):
        model.condition(None, None, 4.0, prompt_embeds=torch.zeros(1, 8, 48),
                        negative_prompt_embeds=torch.zeros(1, 6, 48))
    with pytest.raises(ValueError, match="pass either prompt or prompt_embeds"):
        model.condition(PROMPT, prompt_embeds=torch.zeros(1, 8, 48))


def test_bad_condition_arguments_raise(klein):
    model = Flux2Model(klein)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-0.5)
    with pytest.raises(ValueError, match="reference-image conditioning"):
        model.condition(PROMPT, image=torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but the prompt has 2"):
        model.condition([PROMPT, OTHER], [NEGATIVE], 4.0)


def test_bad_latents_and_images_raise(dev):
    model = Flux2Model(dev)
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, h, w\)"):
        model.velocity(torch.zeros(1, 4, 4, 4), 0.5, cond)
    with pytest.raises(ValueError, match=r"decode expects latents of shape \(B, 16, h, w\)"):
        model.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, SIZE, SIZE))
    with pytest.raises(TypeError, match="Flux2Model.condition"):
        model.velocity(torch.zeros(1, 16, 2, 2), 0.5, object())


# -- full-size klein builders ---------------------------------------------------------------------------------


def test_klein_builder_miniature_runs_and_full_size_counts():
    components = flux2_klein_components("4b", scale=0.05, device="cpu", dtype=torch.float32)
    model = Flux2Model.from_components(is_distilled=True, **components)
    assert model.is_distilled and not model.has_guidance_embedding
    assert model.transformer.config.joint_attention_dim == 3 * model.pipeline.text_encoder.config.hidden_size
    cond = model.condition(PROMPT, max_sequence_length=16)
    v = model.velocity(torch.randn(1, 128, 2, 2, generator=_gen()), 0.5, cond)
    assert v.shape == (1, 128, 2, 2) and torch.isfinite(v).all()
    assert 3.85e9 < parameter_count(flux2_klein_transformer("4b", 1.0, "meta")) < 3.9e9
    assert 9.05e9 < parameter_count(flux2_klein_transformer("9b", 1.0, "meta")) < 9.1e9
    assert 83e6 < parameter_count(flux2_vae(1.0, "meta")) < 85e6
    with pytest.raises(ValueError, match="CUDA GPU only"):
        flux2_klein_transformer("4b", 1.0, "cpu")
    with pytest.raises(ValueError, match="size must be '4b' or '9b'"):
        flux2_klein_transformer("2b", 0.1, "cpu")
