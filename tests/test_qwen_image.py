"""Qwen-Image adapter against diffusers' QwenImagePipeline (the oracle), with tiny offline components."""

import math

import pytest
import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImagePipeline

from guidance.backbones.flux import pack_latents, unpack_latents
from guidance.backbones.qwen_image import QwenImageCondition, QwenImageModel
from guidance.sampler import sample
from tasks.random_models.common import parameter_count
from tasks.random_models.qwen_image import (
    NEGATIVE,
    PROMPT,
    QWEN_TEXT_WIDTH,
    full_size_parameter_count,
    qwen_image_components,
    tiny_qwen_image_components,
    tiny_qwen_image_pipeline,
)

ATOL = 1e-5
SIZE = 64  # 8x8 latents, 16 packed tokens
STEPS = 3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_image_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return QwenImageModel(pipe)


#: case -> (pipeline call, condition positional arguments, condition keyword arguments, image side)
CASES = {
    "prompt": (dict(prompt=PROMPT), (PROMPT,), {}, SIZE),
    "true-cfg": (dict(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0), (PROMPT, NEGATIVE),
                 dict(true_cfg_scale=3.0), SIZE),
    "cfg-off-scale-1": (dict(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=1.0), (PROMPT, NEGATIVE),
                        dict(true_cfg_scale=1.0), SIZE),
    "batched-true-cfg": (dict(prompt=[PROMPT, "a cat"], negative_prompt=[NEGATIVE, "blurry"], true_cfg_scale=3.0),
                         ([PROMPT, "a cat"], [NEGATIVE, "blurry"]), dict(true_cfg_scale=3.0), SIZE),
    "batched": (dict(prompt=[PROMPT, "a blue bird"]), ([PROMPT, "a blue bird"],), {}, SIZE),
    "two-per-prompt-true-cfg": (dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2),
                                (PROMPT, NEGATIVE), {}, SIZE),
    "empty-negative-32px": (dict(prompt=PROMPT, negative_prompt="", true_cfg_scale=2.0), (PROMPT, ""),
                            dict(true_cfg_scale=2.0), 32),
    "unconditional": (dict(prompt=""), (), {}, SIZE),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_pipeline(case, pipe, model):
    call, args, kwargs, size = CASES[case]
    call = dict(call, num_inference_steps=STEPS, height=size, width=size)
    packed = pipe(generator=_gen(), output_type="latent", **call).images
    ref_sigmas = pipe.scheduler.sigmas.clone()
    ref_image = pipe(generator=_gen(), output_type="pt", **call).images

    cond = model.condition(*args, **kwargs)
    assert cond.do_true_cfg == ("true-cfg" in case or "negative" in case)
    batch = ref_image.shape[0]
    out = sample(model, cond, num_steps=STEPS, height=size, width=size, generator=_gen(), batch_size=batch,
                 progress=False)

    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=1e-7)
    ref_latent = QwenImagePipeline._unpack_latents(packed, size, size, pipe.vae_scale_factor)[:, :, 0]
    assert out.x.shape == ref_latent.shape == (batch, 16, size // 8, size // 8)
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert ((out.image / 2 + 0.5).clamp(0, 1) - ref_image).abs().max() <= ATOL


def test_noise_matches_pipeline_latents(pipe, model):
    """The pipeline draws (B, 1, C, h, w) noise and packs it; the sampler's first state is that noise."""
    packed = pipe.prepare_latents(2, 16, SIZE, SIZE, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    sample(model, model.condition(PROMPT), num_steps=2, height=SIZE, width=SIZE, generator=_gen(7), batch_size=2,
           progress=False, decode=False, callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(pack_latents(seen["x"]), packed, rtol=0, atol=0)


def test_packing_is_the_pipelines():
    x = torch.randn(2, 16, 6, 10, generator=_gen())
    tokens = pack_latents(x)
    torch.testing.assert_close(tokens, QwenImagePipeline._pack_latents(x[:, None], 2, 16, 6, 10), rtol=0, atol=0)
    unpacked = QwenImagePipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8)[:, :, 0]
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), unpacked, rtol=0, atol=0)


def test_schedule_is_the_exponential_shift_with_terminal(model):
    """At 1024 px (4096 tokens) mu is on the line through (256, 0.5) and (8192, 0.9); the shifted schedule is then
    stretched so that its last nonzero sigma is shift_terminal = 0.02."""
    n = 4
    sig = model.sigmas(n, 1024, 1024).double()
    mu = 0.5 + (4096 - 256) * (0.9 - 0.5) / (8192 - 256)
    s = torch.linspace(1, 1 / n, n, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    stretch = (1 - shifted[-1]) / (1 - 0.02)
    expected = 1 - (1 - shifted) / stretch
    torch.testing.assert_close(sig[:-1], expected, rtol=0, atol=1e-6)
    assert sig[-1] == 0 and abs(sig[-2] - 0.02) < 1e-7
    assert not torch.equal(model.sigmas(n, 512, 512), model.sigmas(n, 1024, 1024))  # mu follows the size


def test_template_prefix_is_dropped_exactly(pipe):
    """The builder's tokenizer splits the template's system part into 34 tokens, as Qwen2's does, so the pipeline's
    drop index removes exactly it: the embeddings have one row per prompt token plus the template's tail."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    tail = len(pipe.tokenizer(pipe.prompt_template_encode.split("{}")[1]).input_ids)
    embeds, mask = pipe.encode_prompt([PROMPT, "a cat"], device="cpu")
    assert embeds.shape == (2, len(PROMPT.split()) + tail, 32)
    assert mask[1].sum() == 2 + tail


def test_true_cfg_needs_a_negative_and_a_scale_above_one(model):
    assert not model.condition(PROMPT).do_true_cfg  # t = 4 by default, but no negative prompt
    assert not model.condition(PROMPT, NEGATIVE, true_cfg_scale=1.0).do_true_cfg
    assert model.condition(PROMPT, " ").do_true_cfg


def test_true_cfg_rescales_every_token_to_the_conditional_norm(model):
    x = torch.randn(1, 16, 8, 8, generator=_gen())
    v_pos = model.velocity(x, 0.7, model.condition(PROMPT))
    v_neg = model.velocity(x, 0.7, model.condition(NEGATIVE))
    v = model.velocity(x, 0.7, model.condition(PROMPT, NEGATIVE, true_cfg_scale=3.0))
    guided = pack_latents(v_neg + 3.0 * (v_pos - v_neg))
    expected = guided * pack_latents(v_pos).norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(pack_latents(v), expected, rtol=0, atol=1e-5)
    assert (v - v_pos).abs().max() > 1e-3


def test_guidance_scale_is_ignored_without_guidance_embedding_with_a_warning(model):
    x = torch.randn(1, 16, 8, 8, generator=_gen())
    with pytest.warns(UserWarning, match="guidance_scale=2 is ignored.*true_cfg_scale"):
        a = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=2.0))
    with pytest.warns(UserWarning, match="guidance_scale=6 is ignored"):
        b = model.velocity(x, 0.6, model.condition(PROMPT, guidance_scale=6.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guidance_distilled_transformer_that_cannot_run_is_refused():
    with pytest.raises(ValueError, match="guidance_embeds=True .* cannot run"):
        QwenImageModel.from_components(**tiny_qwen_image_components(guidance_embeds=True))


def test_precomputed_embeddings_equal_prompt(pipe, model):
    embeds, mask = pipe.encode_prompt([PROMPT, "a cat"], device="cpu")
    negative, negative_mask = pipe.encode_prompt([NEGATIVE, NEGATIVE], device="cpu")
    x = torch.randn(2, 16, 4, 4, generator=_gen())
    from_text = model.velocity(x, 0.5, model.condition([PROMPT, "a cat"], NEGATIVE))
    from_embeds = model.velocity(x, 0.5, model.condition(prompt_embeds=embeds, prompt_embeds_mask=mask,
                                                         negative_prompt_embeds=negative,
                                                         negative_prompt_embeds_mask=negative_mask))
    from_mixed = model.velocity(x, 0.5, model.condition(prompt_embeds=embeds, prompt_embeds_mask=mask,
                                                        negative_prompt=NEGATIVE))
    torch.testing.assert_close(from_embeds, from_text, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_mixed, from_text, rtol=0, atol=1e-6)


def test_condition_is_cached(model):
    assert model.condition(PROMPT, NEGATIVE) is model.condition(PROMPT, NEGATIVE)
    assert isinstance(model.condition(), QwenImageCondition) and model.condition().batch_size == 1


def test_velocity_gradient_only_when_asked(model):
    cond = model.condition(PROMPT, NEGATIVE)
    x = torch.randn(1, 16, 4, 4, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, 0.5, cond).requires_grad
    model.velocity(x, 0.5, cond, grad=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_encode_decode_use_the_per_channel_statistics(pipe, model):
    """encode is img2img's ``_encode_vae_image`` (the same posterior draw) without the frame axis; decode inverts
    the normalisation as the text-to-image pipeline does before ``vae.decode``."""
    image = torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    img2img = QwenImageImg2ImgPipeline(**pipe.components)
    reference = img2img._encode_vae_image(image[:, :, None], _gen(3))[:, :, 0]
    torch.testing.assert_close(model.encode(image, _gen(3)), reference, rtol=0, atol=1e-6)
    z = model.encode(image)
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 16, 1, 1)
    torch.testing.assert_close(z, (pipe.vae.encode(image[:, :, None]).latent_dist.mean[:, :, 0] - mean) / std)
    torch.testing.assert_close(model.decode(z), pipe.vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0])


def test_encode_and_decode_are_differentiable(model):
    image = (torch.rand(1, 3, 32, 32, generator=_gen()) * 2 - 1).requires_grad_()
    with torch.enable_grad():
        z = model.encode(image)
        z.square().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    latent = torch.randn(1, 16, 4, 4, generator=_gen()).mul(0.1).requires_grad_()
    with torch.enable_grad():
        model.decode(latent).sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_vae_tiling_switches_on_and_off(model):
    latent = torch.randn(1, 16, 8, 8, generator=_gen())
    whole = model.decode(latent)
    model.enable_vae_tiling(32, 0.25)
    try:
        assert model.pipeline.vae.use_tiling and model.pipeline.vae.tile_sample_stride_height == 24
        assert model.decode(latent).shape == whole.shape
    finally:
        model.disable_vae_tiling()
    torch.testing.assert_close(model.decode(latent), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the autoencoder's factor 8"):
        model.enable_vae_tiling(36)


def test_geometry(model):
    assert model.size_multiple == 16 and model.spatial_factor == 8 and model.default_size == (1024, 1024)
    assert model.latent_shape(32, 64) == (16, 4, 8)
    assert model.image_channels == 3


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_not_multiple_of_16_raises(model):
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_shape(SIZE, 56)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.sigmas(4, 72, SIZE)


def test_one_step_schedule_with_terminal_stretch_raises(pipe, model):
    """The released scheduler's stretch to shift_terminal divides 0 by 0 for one step: the pipeline gets NaN."""
    with pytest.warns(RuntimeWarning, match="invalid value"):
        pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="latent")
    assert pipe.scheduler.sigmas[0].isnan()
    with pytest.raises(ValueError, match="use num_steps >= 2"):
        model.sigmas(1, 32, 32)


def test_latents_of_wrong_shape_raise(model):
    cond = model.condition(PROMPT)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, h, w\) with even h and w"):
        model.velocity(torch.zeros(1, 16, 5, 4), 0.5, cond)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, h, w\)"):
        model.velocity(torch.zeros(1, 4, 4, 4), 0.5, cond)
    with pytest.raises(ValueError, match=r"decode expects latents of shape \(B, 16, h, w\)"):
        model.decode(torch.zeros(1, 16, 1, 4, 4))


def test_prompt_embeddings_of_wrong_shape_raise(model):
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 32\)"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 3584))
    with pytest.raises(ValueError, match=r"prompt_embeds_mask must have shape \(1, 8\)"):
        model.condition(prompt_embeds=torch.zeros(1, 8, 32), prompt_embeds_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="negative_prompt_embeds has batch 1 but prompt_embeds has 2"):
        model.condition(prompt_embeds=torch.zeros(2, 8, 32), negative_prompt_embeds=torch.zeros(1, 8, 32))
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        model.condition(PROMPT, prompt_embeds=torch.zeros(1, 8, 32))


def test_bad_scales_raise(model):
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-0.5)
    with pytest.raises(ValueError, match="true_cfg_scale must be >= 0"):
        model.condition(PROMPT, NEGATIVE, true_cfg_scale=-1.0)
    with pytest.raises(ValueError, match=r"max_sequence_length must be an integer in \[1, 1024\]"):
        model.condition(PROMPT, max_sequence_length=2048)


def test_image_with_wrong_channels_raises(model):
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, SIZE, SIZE))


def test_foreign_condition_raises(model):
    with pytest.raises(TypeError, match="cond must come from QwenImageModel.condition"):
        model.velocity(torch.zeros(1, 16, 4, 4), 0.5, cond=object())


# -- the full-size architecture ---------------------------------------------------------------------------------


def test_full_size_architecture_counts_and_miniature_runs():
    assert full_size_parameter_count() == 20_430_401_088
    with pytest.raises(ValueError, match="CUDA GPU only"):
        qwen_image_components(1.0, device="cpu")
    components = qwen_image_components(0.05, device="cpu", dtype=torch.float32)
    assert components["transformer"].config.num_layers == 3
    assert components["transformer"].config.joint_attention_dim == 128 == QWEN_TEXT_WIDTH // 28
    assert parameter_count(components["vae"]) < 2_000_000
    model = QwenImageModel.from_components(**components)
    out = sample(model, model.condition(PROMPT, NEGATIVE), num_steps=2, height=32, width=32, generator=_gen(),
                 progress=False)
    assert out.image.shape == (1, 3, 32, 32) and torch.isfinite(out.image).all()
