"""Chroma adapter against diffusers' ChromaPipeline (the oracle), with tiny offline components."""

import numpy as np
import pytest
import torch
from diffusers import ChromaImg2ImgPipeline, ChromaInpaintPipeline, ChromaPipeline
from tiny_models import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, NEGATIVE, PROMPT

from guidance.backbones.chroma import ChromaCondition, ChromaModel
from guidance.backbones.flux import pack_latents
from guidance.sampler import sample
from tasks.random_models.common import parameter_count
from tasks.random_models.chroma import (chroma_hd_config, chroma_hd_transformer, tiny_chroma_components,
                                         tiny_chroma_pipeline)

ATOL = 1e-5
SIZE = 64  # 8x8 latents, 16 packed tokens
SEQ = 24  # T5 tokens (the pipeline's max_sequence_length), small to keep the tests fast


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _to_unit(image):
    """Our [-1, 1] images in the pipeline's output_type='pt' range [0, 1]."""
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def pipe():
    return tiny_chroma_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return ChromaModel(pipe)


def _pipeline_run(pipe, prompt, negative, guidance, steps, size, seed=0, **extra):
    call = dict(negative_prompt=negative, guidance_scale=guidance, num_inference_steps=steps, height=size,
                width=size, max_sequence_length=SEQ, **extra)
    packed = pipe(prompt, generator=_gen(seed), output_type="latent", **call).images
    sigmas = pipe.scheduler.sigmas.clone()
    image = pipe(prompt, generator=_gen(seed), output_type="pt", **call).images
    return ChromaPipeline._unpack_latents(packed, size, size, pipe.vae_scale_factor), sigmas, image


@pytest.mark.parametrize(
    "negative, guidance, size",
    [(NEGATIVE, 5.0, SIZE), (None, 4.0, SIZE), (NEGATIVE, 1.0, SIZE), (NEGATIVE, 3.0, 32)],
    ids=["cfg-negative", "cfg-empty-negative", "no-cfg", "cfg-32px"],
)
def test_matches_pipeline(pipe, model, negative, guidance, size):
    ref_latent, ref_sigmas, ref_image = _pipeline_run(pipe, PROMPT, negative, guidance, 3, size)

    cond = model.condition(PROMPT, negative, guidance, max_sequence_length=SEQ)
    assert cond.do_cfg == (guidance > 1)
    out = sample(model, cond, num_steps=3, height=size, width=size, generator=_gen(), progress=False)

    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=1e-7)
    assert out.x.dtype == torch.float32 and out.x.shape == ref_latent.shape == (1, 4, size // 8, size // 8)
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert out.image.shape == ref_image.shape
    assert (_to_unit(out.image) - ref_image).abs().max() <= ATOL


def test_unconditional_matches_the_empty_prompt_pipeline(pipe, model):
    """No prompt is the empty prompt; the pipeline's CFG of "" against "" equals the positive branch alone."""
    ref_latent, _, ref_image = _pipeline_run(pipe, "", None, 5.0, 2, 32, seed=2)
    cond = model.condition(max_sequence_length=SEQ)
    assert not cond.do_cfg
    out = sample(model, cond, num_steps=2, height=32, width=32, generator=_gen(2), progress=False)
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert (_to_unit(out.image) - ref_image).abs().max() <= ATOL


def test_batched_prompts_with_several_images_per_prompt(pipe, model):
    prompts = [PROMPT, "a white cat in the city"]
    negatives = [NEGATIVE, "ugly deformed"]
    ref_latent, _, ref_image = _pipeline_run(pipe, prompts, negatives, 5.0, 2, SIZE, seed=3, num_images_per_prompt=2)
    cond = model.condition(prompts, negatives, 5.0, max_sequence_length=SEQ)
    assert cond.batch_size == 2
    out = sample(model, cond, num_steps=2, height=SIZE, width=SIZE, generator=_gen(3), batch_size=4, progress=False)
    assert out.x.shape == ref_latent.shape == (4, 4, 8, 8)
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert (_to_unit(out.image) - ref_image).abs().max() <= ATOL


def test_batched_prompts_without_cfg(pipe, model):
    prompts = [PROMPT, "a white cat in the city"]
    ref_latent, _, _ = _pipeline_run(pipe, prompts, None, 1.0, 2, 32, seed=4)
    cond = model.condition(prompts, guidance_scale=1.0, max_sequence_length=SEQ)
    out = sample(model, cond, num_steps=2, height=32, width=32, generator=_gen(4), progress=False, decode=False)
    assert out.image is None and out.x.shape == (2, 4, 4, 4)
    assert (out.x - ref_latent).abs().max() <= ATOL


def test_noise_matches_pipeline_latents(pipe, model):
    """The pipeline draws unpacked (B, C, h, w) noise and packs it; the sampler's first state is that noise."""
    packed, ids = pipe.prepare_latents(2, 4, SIZE, SIZE, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    sample(model, model.condition(PROMPT, max_sequence_length=SEQ), num_steps=1, height=SIZE, width=SIZE,
           generator=_gen(7), batch_size=2, progress=False, decode=False,
           callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(pack_latents(seen["x"]), packed, rtol=0, atol=0)


def test_schedule_shifts_with_the_image_size(model):
    n = 4
    plain = torch.linspace(1, 1 / n, n, dtype=torch.float64)
    for size, tokens in ((1024, 4096), (512, 1024)):
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        expected = np.exp(mu) / (np.exp(mu) + (1 / plain - 1))
        sigmas = model.sigmas(n, size, size)
        assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32 and sigmas[-1] == 0
        torch.testing.assert_close(sigmas[:-1].double(), expected, rtol=0, atol=1e-6)
    assert model.default_size == (1024, 1024)


def test_text_mask_keeps_the_prompt_and_one_padding_token(model, pipe):
    cond = model.condition(PROMPT, NEGATIVE, 5.0, max_sequence_length=SEQ)
    for text, mask in ((PROMPT, cond.prompt_attention_mask), (NEGATIVE, cond.negative_prompt_attention_mask)):
        n_tokens = len(pipe.tokenizer(text).input_ids)  # words and </s>
        assert mask.shape == (1, SEQ)
        assert mask[0, : n_tokens + 1].eq(1).all() and mask[0, n_tokens + 1:].eq(0).all()
    assert cond.prompt_embeds.shape == (1, SEQ, 32)


def test_condition_is_cached_and_cfg_switches(model):
    a = model.condition(PROMPT, NEGATIVE, 5.0, max_sequence_length=SEQ)
    assert model.condition(PROMPT, NEGATIVE, 5.0, max_sequence_length=SEQ) is a
    assert model.condition(PROMPT, NEGATIVE, 6.0, max_sequence_length=SEQ) is not a
    no_cfg = model.condition(PROMPT, NEGATIVE, 1.0, max_sequence_length=SEQ)
    assert not no_cfg.do_cfg and no_cfg.negative_prompt_embeds is None
    unconditional = model.condition(max_sequence_length=SEQ)
    assert isinstance(unconditional, ChromaCondition) and not unconditional.do_cfg  # "" against "" is skipped
    empty = model.condition("", guidance_scale=1.0, max_sequence_length=SEQ)
    torch.testing.assert_close(unconditional.prompt_embeds, empty.prompt_embeds, rtol=0, atol=0)


def test_cfg_combines_positive_and_negative_velocities(model):
    x = torch.randn(2, 4, 8, 8, generator=_gen())
    w = 3.0
    guided = model.velocity(x, 0.6, model.condition(PROMPT, NEGATIVE, w, max_sequence_length=SEQ))
    v_c = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ))
    v_u = model.velocity(x, 0.6, model.condition(NEGATIVE, guidance_scale=1.0, max_sequence_length=SEQ))
    assert (v_c - v_u).abs().max() > 1e-3
    torch.testing.assert_close(guided, v_u + w * (v_c - v_u), rtol=0, atol=1e-5)


def test_precomputed_embeddings_equal_prompt(model):
    a = model.condition(PROMPT, NEGATIVE, 5.0, max_sequence_length=SEQ)
    b = model.condition(
        prompt_embeds=a.prompt_embeds, prompt_attention_mask=a.prompt_attention_mask,
        negative_prompt_embeds=a.negative_prompt_embeds,
        negative_prompt_attention_mask=a.negative_prompt_attention_mask, guidance_scale=5.0,
    )
    c = model.condition(negative_prompt=NEGATIVE, prompt_embeds=a.prompt_embeds,
                        prompt_attention_mask=a.prompt_attention_mask, guidance_scale=5.0)
    x = torch.randn(1, 4, 8, 8, generator=_gen())
    v = model.velocity(x, 0.7, a)
    torch.testing.assert_close(model.velocity(x, 0.7, b), v, rtol=0, atol=0)
    torch.testing.assert_close(model.velocity(x, 0.7, c), v, rtol=0, atol=0)


def test_velocity_gradient_only_when_asked(model):
    cond = model.condition(PROMPT, NEGATIVE, 5.0, max_sequence_length=SEQ)
    x = torch.randn(2, 4, 8, 8, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, torch.tensor([0.9, 0.4]), cond).requires_grad
    v = model.velocity(x, torch.tensor([0.9, 0.4]), cond, grad=True)
    v.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradient_checkpointing_keeps_the_text_mask():
    """diffusers drops the single-stream blocks' mask under checkpointing; the adapter hands it back."""
    pipe = tiny_chroma_pipeline()
    model = ChromaModel(pipe)
    cond = model.condition(PROMPT, NEGATIVE, 5.0, max_sequence_length=SEQ)
    x = torch.randn(1, 4, 8, 8, generator=_gen(), requires_grad=True)
    v = model.velocity(x, 0.5, cond, grad=True)
    (g,) = torch.autograd.grad(v.square().sum(), x)
    pipe.transformer.enable_gradient_checkpointing()
    checkpoint = pipe.transformer._gradient_checkpointing_func
    v_ckpt = model.velocity(x, 0.5, cond, grad=True)
    (g_ckpt,) = torch.autograd.grad(v_ckpt.square().sum(), x)
    assert pipe.transformer._gradient_checkpointing_func is checkpoint  # restored after the call
    torch.testing.assert_close(v_ckpt, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_ckpt, g, rtol=0, atol=1e-5)


def test_encode_decode_use_flux_vae_factors(pipe, model):
    image = torch.rand(2, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    dist = pipe.vae.encode(image).latent_dist
    z = model.encode(image)
    assert z.shape == (2, *model.latent_shape(SIZE, SIZE)) == (2, 4, 8, 8)
    torch.testing.assert_close(z, (dist.mean - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE)
    # the img2img pipeline's own encoding: a posterior sample, shifted then scaled
    img2img = ChromaImg2ImgPipeline(**pipe.components)
    torch.testing.assert_close(model.encode(image, generator=_gen(5)), img2img._encode_vae_image(image, _gen(5)))
    torch.testing.assert_close(model.decode(z), pipe.vae.decode(z / FLUX_VAE_SCALE + FLUX_VAE_SHIFT).sample)


def test_encode_and_decode_are_differentiable(model):
    image = (torch.rand(1, 3, 32, 32, generator=_gen()) * 2 - 1).requires_grad_(True)
    with torch.enable_grad():
        model.decode(model.encode(image)).square().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


@pytest.mark.parametrize("pipeline_class", [ChromaImg2ImgPipeline, ChromaInpaintPipeline])
def test_img2img_and_inpaint_pipelines_share_the_components(pipe, model, pipeline_class):
    other = ChromaModel(pipeline_class(**pipe.components))
    x = torch.randn(1, 4, 4, 4, generator=_gen())
    kw = dict(max_sequence_length=SEQ)
    torch.testing.assert_close(other.velocity(x, 0.5, other.condition(PROMPT, NEGATIVE, 5.0, **kw)),
                               model.velocity(x, 0.5, model.condition(PROMPT, NEGATIVE, 5.0, **kw)), rtol=0, atol=0)
    assert other.sigmas(4, 32, 32).equal(model.sigmas(4, 32, 32))


def test_from_components_and_full_size_config():
    model = ChromaModel.from_components(**tiny_chroma_components())
    assert isinstance(model.pipeline, ChromaPipeline) and model.size_multiple == 16 and model.spatial_factor == 8
    config = chroma_hd_config(1.0)
    assert (config["num_layers"], config["num_single_layers"], config["approximator_hidden_dim"]) == (19, 38, 5120)
    small = chroma_hd_config(0.1)
    assert small["num_layers"] == 2 and small["num_attention_heads"] == 2 and small["joint_attention_dim"] == 416
    assert 8.85e9 < parameter_count(chroma_hd_transformer(1.0, "meta")) < 8.95e9  # "8.9B"
    with pytest.raises(ValueError, match="on a CUDA GPU only"):
        chroma_hd_transformer(1.0, "cpu")


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_not_multiple_of_16_raises(model):
    assert model.size_multiple == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_shape(SIZE, 56)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.sigmas(4, 72, SIZE)
    with pytest.raises(ValueError, match="multiple of 16"):
        sample(model, model.condition(PROMPT, max_sequence_length=SEQ), num_steps=2, height=32, width=24,
               progress=False)


def test_latent_of_wrong_shape_raises(model):
    cond = model.condition(PROMPT, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, h, w\) with even h and w"):
        model.velocity(torch.zeros(1, 16, 4, 4), 0.5, cond)
    with pytest.raises(ValueError, match="even h and w"):
        model.velocity(torch.zeros(1, 4, 5, 4), 0.5, cond)
    with pytest.raises(TypeError, match="ChromaModel.condition"):
        model.velocity(torch.zeros(1, 4, 4, 4), 0.5, {"prompt": PROMPT})


def test_prompt_embeddings_of_wrong_shape_raise(model):
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 32\)"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 7), prompt_attention_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"prompt_attention_mask must have shape \(1, 8\)"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 32), prompt_attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="prompt_embeds and prompt_attention_mask must be given together"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 32))
    with pytest.raises(ValueError, match="must have the shape of prompt_embeds"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 32), prompt_attention_mask=torch.ones(1, 8),
                        negative_prompt_embeds=torch.zeros(1, 6, 32),
                        negative_prompt_attention_mask=torch.ones(1, 6), guidance_scale=5.0)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        model.condition(PROMPT, prompt_embeds=torch.zeros(1, 8, 32), prompt_attention_mask=torch.ones(1, 8))


def test_bad_guidance_and_sequence_length_raise(model):
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-0.5)
    with pytest.raises(ValueError, match=r"max_sequence_length must be an integer in \[1, 512\]"):
        model.condition(PROMPT, max_sequence_length=600)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but the prompt has 2"):
        model.condition([PROMPT, PROMPT], [NEGATIVE], 5.0, max_sequence_length=SEQ)


def test_image_with_wrong_channels_raises(model):
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, SIZE, SIZE))


def test_mismatched_components_raise():
    components = tiny_chroma_components()
    components["vae"].register_to_config(latent_channels=8)
    with pytest.raises(ValueError, match="the components do not belong together"):
        ChromaModel.from_components(**components)
