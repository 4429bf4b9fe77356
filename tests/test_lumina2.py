"""Lumina-Image 2.0 adapter against diffusers' Lumina2Pipeline (the oracle), with tiny offline components."""

import math

import numpy as np
import pytest
import torch
from tiny_models import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, NEGATIVE, PROMPT

from guidance.backbones.lumina2 import Lumina2Condition, Lumina2Model
from guidance.sampler import sample
from tasks.random_models.lumina2 import tiny_lumina2_pipeline

ATOL = 1e-5
SIZE = 64  # 8x8 latents, 16 patches
SEQ = 64  # Gemma tokens (the pipeline's max_sequence_length): the system prompt takes 31
OTHER, OTHER_NEGATIVE = "a white cat", "ugly deformed"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_lumina2_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return Lumina2Model(pipe)


CASES = {
    "no-cfg": dict(prompt=PROMPT, guidance_scale=1.0),
    "cfg-empty-negative": dict(prompt=PROMPT, guidance_scale=4.0),
    "cfg-negative": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0),
    "cfg-without-normalization": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0,
                                      cfg_normalization=False),
    "two-prompts": dict(prompt=[PROMPT, OTHER], negative_prompt=[NEGATIVE, OTHER_NEGATIVE], guidance_scale=4.0),
    "two-per-prompt": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, num_images_per_prompt=2),
    "cfg-truncation": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.0, cfg_trunc_ratio=0.5),
    "system-prompt": dict(prompt=PROMPT, guidance_scale=4.0, system_prompt="a sharp detailed photo"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pipeline(case, pipe, model):
    kw = CASES[case]
    steps = 4
    call = dict(num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=SEQ,
                guidance_scale=kw["guidance_scale"], num_images_per_prompt=kw.get("num_images_per_prompt", 1),
                cfg_normalization=kw.get("cfg_normalization", True), cfg_trunc_ratio=kw.get("cfg_trunc_ratio", 1.0),
                system_prompt=kw.get("system_prompt"))
    args = (kw["prompt"],)
    ref_latent = pipe(*args, negative_prompt=kw.get("negative_prompt"), generator=_gen(), output_type="latent",
                      **call).images
    ref_sigmas = pipe.scheduler.sigmas.clone()
    ref_image = pipe(*args, negative_prompt=kw.get("negative_prompt"), generator=_gen(), output_type="pt",
                     **call).images

    cond = model.condition(kw["prompt"], kw.get("negative_prompt"), kw["guidance_scale"],
                           cfg_normalization=call["cfg_normalization"], cfg_trunc_ratio=call["cfg_trunc_ratio"],
                           num_steps=steps, system_prompt=call["system_prompt"], max_sequence_length=SEQ)
    assert cond.do_cfg == (kw["guidance_scale"] > 1)
    batch = cond.batch_size * call["num_images_per_prompt"]
    out = sample(model, cond, num_steps=steps, height=SIZE, width=SIZE, generator=_gen(), progress=False,
                 batch_size=batch)

    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=0)
    assert out.x.shape == ref_latent.shape == (batch, 16, 8, 8)
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert ((out.image / 2 + 0.5).clamp(0, 1) - ref_image).abs().max() <= ATOL


def test_noise_is_the_pipeline_draw(pipe, model):
    """The pipeline draws (B, 16, h, w) noise in the text encoder's dtype; the sampler's first state is that noise."""
    drawn = pipe.prepare_latents(2, 16, SIZE, SIZE, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    sample(model, model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ), num_steps=1, height=SIZE,
           width=SIZE, generator=_gen(7), batch_size=2, progress=False, decode=False,
           callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(seen["x"], drawn, rtol=0, atol=0)


def test_velocity_is_the_negated_output_at_reversed_time(pipe, model):
    """v(x, s) = -transformer(x, 1 - s): Lumina's time runs from noise (0) to data (1), its output is x0 - eps."""
    cond = model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ)
    x = torch.randn(1, 16, 8, 8, generator=_gen())
    out = pipe.transformer(x, torch.tensor([0.25]), cond.prompt_embeds, cond.prompt_attention_mask,
                           return_dict=False)[0]
    torch.testing.assert_close(model.velocity(x, 0.75, cond), -out, rtol=0, atol=1e-6)


def test_sigmas_follow_the_pipeline_rule():
    steps = 4
    base = np.linspace(1.0, 1 / steps, steps)
    static = Lumina2Model(tiny_lumina2_pipeline(dynamic_shift=False)).sigmas(steps, SIZE, SIZE)  # released: shift 6
    torch.testing.assert_close(static[:-1].double(), torch.from_numpy(6 * base / (1 + 5 * base)), rtol=0, atol=1e-6)
    model = Lumina2Model(tiny_lumina2_pipeline())
    mu = 0.5 + (16 - 256) * 0.65 / 3840  # mu at the channel count, 16, at every size (the pipeline's rule)
    expected = torch.from_numpy(np.exp(mu) / (np.exp(mu) + 1 / base - 1))
    for size in (SIZE, 512):
        torch.testing.assert_close(model.sigmas(steps, size, size)[:-1].double(), expected, rtol=0, atol=1e-6)
    assert static[-1] == 0 and len(static) == steps + 1


def test_guidance_switches(model):
    x = torch.randn(1, 16, 8, 8, generator=_gen(3))
    plain = model.velocity(x, 0.4, model.condition(PROMPT, guidance_scale=1.0, max_sequence_length=SEQ))
    raw = model.condition(PROMPT, NEGATIVE, 4.0, cfg_normalization=False, max_sequence_length=SEQ)
    guided = model.velocity(x, 0.4, raw)
    neg = model._encode_plain([NEGATIVE], SEQ)
    v_neg = model.velocity(x, 0.4, Lumina2Condition(neg[0], neg[1], 1.0))
    torch.testing.assert_close(guided, v_neg + 4.0 * (plain - v_neg), rtol=0, atol=1e-5)
    # normalization: every row along the last latent axis gets the conditional velocity's norm
    normed = model.velocity(x, 0.4, model.condition(PROMPT, NEGATIVE, 4.0, max_sequence_length=SEQ))
    torch.testing.assert_close(normed.norm(dim=-1), plain.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert (normed.norm(dim=-1) - guided.norm(dim=-1)).abs().max() > 1e-3
    # truncation r = 0.5 of 4 steps: guidance at steps 0 and 1 only, i.e. where s >= sigma_1
    sigmas = model.sigmas(4)
    cut = model.condition(PROMPT, NEGATIVE, 4.0, cfg_normalization=False, cfg_trunc_ratio=0.5, num_steps=4,
                          max_sequence_length=SEQ)
    assert cut.cfg_sigma_floor == float(sigmas[1])
    both = model.velocity(torch.cat([x, x]), torch.stack([sigmas[1], sigmas[2]]), cut)  # batched: float32 rounding
    torch.testing.assert_close(both[:1], model.velocity(x, sigmas[1], raw), rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:], model.velocity(x, sigmas[2], model.condition(
        PROMPT, guidance_scale=1.0, max_sequence_length=SEQ)), rtol=0, atol=1e-5)
    never = model.condition(PROMPT, NEGATIVE, 4.0, cfg_trunc_ratio=0.1, num_steps=4, max_sequence_length=SEQ)
    assert never.cfg_sigma_floor == math.inf
    torch.testing.assert_close(model.velocity(x, 1.0, never), model.velocity(x, 1.0, model.condition(
        PROMPT, guidance_scale=1.0, max_sequence_length=SEQ)), rtol=0, atol=1e-5)


def test_prompt_embeds_replace_the_prompt(model):
    cond = model.condition(PROMPT, None, 4.0, max_sequence_length=SEQ)
    assert cond.prompt_embeds.shape == (1, SEQ, 8) and int(cond.prompt_attention_mask.sum()) == 31 + 10
    again = model.condition(prompt_embeds=cond.prompt_embeds, prompt_attention_mask=cond.prompt_attention_mask,
                            guidance_scale=4.0)
    x = torch.randn(1, 16, 8, 8, generator=_gen())
    torch.testing.assert_close(model.velocity(x, 0.5, again), model.velocity(x, 0.5, cond), rtol=0, atol=0)


def test_encode_decode_use_the_vae_factors(pipe, model):
    image = torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    z = model.encode(image)
    torch.testing.assert_close(z, (pipe.vae.encode(image).latent_dist.mean - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE)
    torch.testing.assert_close(model.decode(z), pipe.vae.decode(z / FLUX_VAE_SCALE + FLUX_VAE_SHIFT).sample)


def test_velocity_gradient_when_asked(model):
    cond = model.condition(PROMPT, NEGATIVE, 4.0, max_sequence_length=SEQ)
    x = torch.randn(1, 16, 8, 8, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, 0.5, cond).requires_grad
    model.velocity(x, 0.5, cond, grad=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_geometry(model):
    assert model.size_multiple == 16 and model.spatial_factor == 8 and model.default_size == (64, 64)
    assert model.max_size == 8192  # 512 rows / columns of 2x2 patches in the rotary tables
    assert model.latent_shape(32, 48) == (16, 4, 6)


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_errors(model):
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_shape(SIZE, 56)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.sigmas(4, 72, SIZE)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, h, w\)"):
        model.velocity(torch.zeros(1, 16, 8, 7), 0.5, model.condition(PROMPT, guidance_scale=1.0))


def test_embedding_errors(model):
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(batch, tokens, 8\)"):
        model.condition(prompt_embeds=torch.zeros(1, 5, 4), prompt_attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"prompt_attention_mask must have shape \(1, 5\)"):
        model.condition(prompt_embeds=torch.zeros(1, 5, 8), prompt_attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="prompt_embeds and prompt_attention_mask must be given together"):
        model.condition(prompt_embeds=torch.zeros(1, 5, 8))
    with pytest.raises(ValueError, match=r"negative_prompt_embeds \(1, 4, 8\) must have the shape of prompt_embeds"):
        model.condition(prompt_embeds=torch.zeros(1, 5, 8), prompt_attention_mask=torch.ones(1, 5),
                        negative_prompt_embeds=torch.zeros(1, 4, 8), negative_prompt_attention_mask=torch.ones(1, 4))


def test_bad_settings_raise(model):
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-0.5)
    with pytest.raises(ValueError, match="pass num_steps"):
        model.condition(PROMPT, NEGATIVE, 4.0, cfg_trunc_ratio=0.5)
    with pytest.raises(ValueError, match="max_sequence_length must be an integer from 1 to 512"):
        model.condition(PROMPT, max_sequence_length=600)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but the prompt has 2"):
        model.condition([PROMPT, OTHER], [NEGATIVE])
    with pytest.raises(TypeError, match="cond must come from Lumina2Model.condition"):
        model.velocity(torch.zeros(1, 16, 8, 8), 0.5, object())


def test_unconditional_is_the_empty_prompt(model):
    cond = model.condition(guidance_scale=1.0, max_sequence_length=SEQ)
    assert cond.batch_size == 1 and not cond.do_cfg
    assert int(cond.prompt_attention_mask.sum()) == 31  # <bos>, the system prompt and its marker
