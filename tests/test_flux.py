"""FLUX.1 dev / schnell adapter against diffusers' FluxPipeline (the oracle), with tiny offline components."""

import pytest
import torch
from diffusers import FluxPipeline
from tiny_models import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, NEGATIVE, PROMPT, flux_pipeline

from guidance.backbones.flux import FluxModel, latent_image_ids, pack_latents, unpack_latents
from guidance.sampler import sample

ATOL = 1e-5
SIZE = 64  # 8x8 latents, 16 packed tokens
SEQ = 48  # T5 tokens (the pipeline's max_sequence_length), small to keep the tests fast


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def dev():
    return flux_pipeline(dev=True)


@pytest.fixture(scope="module")
def schnell():
    return flux_pipeline(dev=False)


@pytest.mark.parametrize("kind", ["dev", "schnell", "dev-true-cfg"])
def test_matches_pipeline(kind, request):
    pipe = request.getfixturevalue("schnell" if kind == "schnell" else "dev")
    steps = 4 if kind == "schnell" else 3
    call = dict(num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=SEQ, guidance_scale=4.0)
    cond_kw = dict(guidance_scale=4.0, max_sequence_length=SEQ)
    if kind == "dev-true-cfg":
        call.update(negative_prompt=NEGATIVE, true_cfg_scale=2.5)
        cond_kw.update(negative_prompt=NEGATIVE, true_cfg_scale=2.5)
    packed = pipe(PROMPT, generator=_gen(), output_type="latent", **call).images
    ref_sigmas = pipe.scheduler.sigmas.clone()
    ref_image = pipe(PROMPT, generator=_gen(), output_type="pt", **call).images

    model = FluxModel(pipe)
    cond = model.condition(PROMPT, **cond_kw)
    assert cond.do_true_cfg == (kind == "dev-true-cfg")
    out = sample(model, cond, num_steps=steps, height=SIZE, width=SIZE, generator=_gen(), progress=False)

    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=1e-7)
    ref_latent = FluxPipeline._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor)
    assert out.x.shape == ref_latent.shape == (1, 4, 8, 8)
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert ((out.image / 2 + 0.5).clamp(0, 1) - ref_image).abs().max() <= ATOL


def test_dev_shifts_schnell_does_not(dev, schnell):
    n = 4
    plain = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(FluxModel(schnell).sigmas(n, SIZE, SIZE), plain)
    shifted = FluxModel(dev).sigmas(n, 1024, 1024)  # 4096 tokens: mu = max_shift = 1.15
    mu = torch.tensor(1.15, dtype=torch.float64)
    s = plain[:-1].double()
    expected = torch.exp(mu) / (torch.exp(mu) + (1 / s - 1))
    torch.testing.assert_close(shifted[:-1].double(), expected, rtol=0, atol=1e-6)
    assert shifted[-1] == 0


def test_noise_matches_pipeline_latents(dev):
    """The pipeline draws unpacked (B, C, h, w) noise and packs it; the sampler's first state is that noise."""
    packed, _ = dev.prepare_latents(2, 4, SIZE, SIZE, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    model = FluxModel(dev)
    sample(model, model.condition(PROMPT, max_sequence_length=SEQ), num_steps=1, height=SIZE, width=SIZE,
           generator=_gen(7), batch_size=2, progress=False, decode=False,
           callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(pack_latents(seen["x"]), packed, rtol=0, atol=0)


def test_packing_matches_pipeline_and_round_trips():
    x = torch.randn(2, 4, 6, 10, generator=_gen())
    tokens = pack_latents(x)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), x, rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(latent_image_ids(3, 5), ids, rtol=0, atol=0)


def test_guidance_embedding_changes_dev_only(dev, schnell):
    x = torch.randn(1, 4, 8, 8, generator=_gen())
    for pipe, changes in ((dev, True), (schnell, False)):
        model = FluxModel(pipe)
        a = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=2.0, max_sequence_length=SEQ))
        b = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=6.0, max_sequence_length=SEQ))
        assert ((a - b).abs().max() > 1e-6) == changes


def test_encode_decode_use_flux_vae_factors(dev):
    model = FluxModel(dev)
    image = torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    z = model.encode(image)
    torch.testing.assert_close(z, (dev.vae.encode(image).latent_dist.mean - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE)
    torch.testing.assert_close(model.decode(z), dev.vae.decode(z / FLUX_VAE_SCALE + FLUX_VAE_SHIFT).sample)


def test_velocity_gradient_when_asked(dev):
    model = FluxModel(dev)
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    x = torch.randn(1, 4, 8, 8, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, 0.5, cond).requires_grad
    model.velocity(x, 0.5, cond, grad=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_not_multiple_of_16_raises(dev):
    model = FluxModel(dev)
    assert model.size_multiple == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_shape(SIZE, 56)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.sigmas(4, 72, SIZE)


def test_prompt_embeddings_of_wrong_shape_raise(dev):
    model = FluxModel(dev)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must have shape \(1, 32\)"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 32), pooled_prompt_embeds=torch.zeros(1, 768))


def test_negative_guidance_scale_raises(dev):
    model = FluxModel(dev)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-0.5)


def test_image_with_wrong_channels_raises(dev):
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 3, H, W\)"):
        FluxModel(dev).encode(torch.zeros(1, 1, SIZE, SIZE))
