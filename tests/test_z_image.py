"""Z-Image adapter against diffusers' ZImagePipeline (the oracle), with tiny offline components."""

import numpy as np
import pytest
import torch
from tiny_models import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, NEGATIVE, PROMPT

from guidance.backbones.z_image import ZImageCondition, ZImageModel
from guidance.sampler import sample
from tasks.random_models.z_image import tiny_z_image_pipeline

ATOL = 1e-5
SIZE = 64  # 8x8 latents, 16 patches
SEQ = 32  # text tokens (the pipeline's max_sequence_length), small to keep the tests fast
OTHER, OTHER_NEGATIVE = "a white cat", "ugly deformed"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_z_image_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return ZImageModel(pipe)


CASES = {
    "turbo-no-cfg": dict(prompt=PROMPT, guidance_scale=0.0),
    "cfg-empty-negative": dict(prompt=PROMPT, guidance_scale=3.0),
    "cfg-negative": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=3.0),
    "two-prompts": dict(prompt=[PROMPT, OTHER], negative_prompt=[NEGATIVE, OTHER_NEGATIVE], guidance_scale=3.0),
    "two-per-prompt": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=3.0, num_images_per_prompt=2),
    "two-per-prompt-no-cfg": dict(prompt=PROMPT, guidance_scale=0.0, num_images_per_prompt=2),
    "cfg-normalization": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=6.0, cfg_normalization=1.0),
    "cfg-truncation": dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=3.0, cfg_truncation=0.5),
}


def _copy(texts):
    """A fresh copy: ZImagePipeline rewrites a prompt list it is given in place (chat template)."""
    return list(texts) if isinstance(texts, list) else texts


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pipeline(case, pipe, model):
    kw = CASES[case]
    steps = 4
    call = dict(num_inference_steps=steps, height=SIZE, width=SIZE, max_sequence_length=SEQ,
                guidance_scale=kw["guidance_scale"], num_images_per_prompt=kw.get("num_images_per_prompt", 1),
                cfg_normalization=kw.get("cfg_normalization", False), cfg_truncation=kw.get("cfg_truncation", 1.0))

    def run(output_type):
        return pipe(_copy(kw["prompt"]), negative_prompt=_copy(kw.get("negative_prompt")), generator=_gen(),
                    output_type=output_type, **call).images

    ref_latent = run("latent")
    ref_sigmas = pipe.scheduler.sigmas.clone()
    ref_image = run("pt")

    cond = model.condition(_copy(kw["prompt"]), _copy(kw.get("negative_prompt")), kw["guidance_scale"],
                           cfg_normalization=call["cfg_normalization"], cfg_truncation=call["cfg_truncation"],
                           max_sequence_length=SEQ)
    assert cond.do_cfg == (kw["guidance_scale"] > 0)
    batch = cond.batch_size * call["num_images_per_prompt"]
    out = sample(model, cond, num_steps=steps, height=SIZE, width=SIZE, generator=_gen(), progress=False,
                 batch_size=batch)

    torch.testing.assert_close(out.sigmas, ref_sigmas, rtol=0, atol=0)
    assert out.x.shape == ref_latent.shape == (batch, 16, 8, 8)
    assert (out.x - ref_latent).abs().max() <= ATOL
    assert ((out.image / 2 + 0.5).clamp(0, 1) - ref_image).abs().max() <= ATOL


def test_noise_is_the_pipeline_draw(pipe, model):
    """The pipeline draws (B, 16, h, w) float32 noise; the sampler's first state is that noise."""
    drawn = pipe.prepare_latents(2, 16, SIZE, SIZE, torch.float32, torch.device("cpu"), _gen(7))
    seen = {}
    sample(model, model.condition(PROMPT, guidance_scale=0.0, max_sequence_length=SEQ), num_steps=1, height=SIZE,
           width=SIZE, generator=_gen(7), batch_size=2, progress=False, decode=False,
           callback=lambda info: seen.setdefault("x", info["x"].clone()))
    torch.testing.assert_close(seen["x"], drawn, rtol=0, atol=0)


def test_velocity_is_the_negated_output_at_reversed_time(pipe, model):
    """v(x, s) = -transformer(x, (1000 - 1000 s) / 1000): the model predicts x0 - eps on reversed time."""
    cond = model.condition(PROMPT, guidance_scale=0.0, max_sequence_length=SEQ)
    x = torch.randn(1, 16, 8, 8, generator=_gen())
    out = pipe.transformer([x[0].unsqueeze(1)], torch.tensor([0.3]), list(cond.prompt_embeds), return_dict=False)[0]
    torch.testing.assert_close(model.velocity(x, 0.7, cond), -out[0].squeeze(1)[None], rtol=0, atol=1e-6)


def test_sigmas_follow_the_scheduler_configuration():
    steps = 4
    base = np.linspace(1.0, 1 / steps, steps)
    static = ZImageModel(tiny_z_image_pipeline(dynamic_shift=False)).sigmas(steps, SIZE, SIZE)  # Turbo: shift 3
    torch.testing.assert_close(static[:-1].double(), torch.from_numpy(3 * base / (1 + 2 * base)), rtol=0, atol=1e-6)
    dynamic = ZImageModel(tiny_z_image_pipeline()).sigmas(steps, 1024, 1024)  # 4096 tokens: mu = max_shift
    mu = 1.15
    torch.testing.assert_close(dynamic[:-1].double(), torch.from_numpy(np.exp(mu) / (np.exp(mu) + 1 / base - 1)),
                               rtol=0, atol=1e-6)
    assert static[-1] == dynamic[-1] == 0 and len(static) == steps + 1


def test_guidance_switches(model):
    x = torch.randn(1, 16, 8, 8, generator=_gen(3))
    plain = model.velocity(x, 0.4, model.condition(PROMPT, guidance_scale=0.0, max_sequence_length=SEQ))
    guided_cond = model.condition(PROMPT, NEGATIVE, 3.0, max_sequence_length=SEQ)
    guided = model.velocity(x, 0.4, guided_cond)
    v_neg = model.velocity(x, 0.4, model.condition(NEGATIVE, guidance_scale=0.0, max_sequence_length=SEQ))
    torch.testing.assert_close(guided, plain + 3.0 * (plain - v_neg), rtol=0, atol=1e-5)
    # truncation at tau = 0.5: guidance where t = 1 - s <= 0.5 only
    cut = model.condition(PROMPT, NEGATIVE, 3.0, cfg_truncation=0.5, max_sequence_length=SEQ)
    torch.testing.assert_close(model.velocity(x, 0.7, cut), model.velocity(x, 0.7, guided_cond), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.velocity(x, 0.4, cut), plain, rtol=0, atol=1e-6)
    # per sample: a (B,) sigma on both sides of the cut
    both = model.velocity(torch.cat([x, x]), torch.tensor([0.7, 0.4]), cut)
    torch.testing.assert_close(both[1:], plain, rtol=0, atol=1e-6)
    assert (both[:1] - plain).abs().max() > 1e-3
    # normalization caps the guided norm at c |v_c|
    capped = model.velocity(x, 0.4, model.condition(PROMPT, NEGATIVE, 3.0, cfg_normalization=1.0,
                                                    max_sequence_length=SEQ))
    torch.testing.assert_close(capped.norm(), plain.norm(), rtol=1e-5, atol=0)
    assert guided.norm() > 1.01 * plain.norm()


def test_prompt_embeds_replace_the_prompt(model):
    cond = model.condition(PROMPT, NEGATIVE, 3.0, max_sequence_length=SEQ)
    assert [e.shape[0] for e in cond.prompt_embeds] == [15]  # chat-templated prompt, unpadded
    again = model.condition(prompt_embeds=list(cond.prompt_embeds), negative_prompt=NEGATIVE, guidance_scale=3.0,
                            max_sequence_length=SEQ)
    x = torch.randn(1, 16, 8, 8, generator=_gen())
    torch.testing.assert_close(model.velocity(x, 0.5, again), model.velocity(x, 0.5, cond), rtol=0, atol=0)


def test_encode_decode_use_the_vae_factors(pipe, model):
    image = torch.rand(1, 3, SIZE, SIZE, generator=_gen()) * 2 - 1
    z = model.encode(image)
    torch.testing.assert_close(z, (pipe.vae.encode(image).latent_dist.mean - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE)
    torch.testing.assert_close(model.decode(z), pipe.vae.decode(z / FLUX_VAE_SCALE + FLUX_VAE_SHIFT).sample)


def test_velocity_gradient_when_asked(model):
    cond = model.condition(PROMPT, NEGATIVE, 3.0, max_sequence_length=SEQ)
    x = torch.randn(1, 16, 8, 8, generator=_gen(), requires_grad=True)
    assert not model.velocity(x, 0.5, cond).requires_grad
    model.velocity(x, 0.5, cond, grad=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_geometry(model):
    assert model.size_multiple == 16 and model.spatial_factor == 8 and model.default_size == (1024, 1024)
    assert model.max_size == 1024  # 64 rows / columns of 2x2 patches in the tiny rotary tables
    assert model.latent_shape(32, 48) == (16, 4, 6)


# -- bad input ----------------------------------------------------------------------------------------------


def test_size_errors(model):
    with pytest.raises(ValueError, match="multiple of 16"):
        model.latent_shape(SIZE, 56)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.sigmas(4, 72, SIZE)
    with pytest.raises(ValueError, match="larger than ZImageModel accepts"):
        model.latent_shape(1040, SIZE)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, h, w\)"):
        model.velocity(torch.zeros(1, 16, 7, 8), 0.5, model.condition(PROMPT, guidance_scale=0.0))


def test_embedding_errors(model):
    with pytest.raises(ValueError, match=r"prompt_embeds must be a list of \(tokens, 16\) tensors"):
        model.condition(prompt_embeds=[torch.zeros(5, 8)], guidance_scale=0.0)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must be a list of \(tokens, 16\) tensors"):
        model.condition(prompt_embeds=[torch.zeros(5, 16)], negative_prompt_embeds=torch.zeros(5, 16))
    with pytest.raises(ValueError, match="negative_prompt_embeds has 2 entries but prompt_embeds has 1"):
        model.condition(prompt_embeds=[torch.zeros(5, 16)], negative_prompt_embeds=[torch.zeros(3, 16)] * 2)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        model.condition(PROMPT, prompt_embeds=[torch.zeros(5, 16)])


def test_bad_settings_raise(model):
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.condition(PROMPT, guidance_scale=-0.5)
    with pytest.raises(ValueError, match="cfg_normalization must be >= 0"):
        model.condition(PROMPT, cfg_normalization=-1.0)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but the prompt has 2"):
        model.condition([PROMPT, OTHER], [NEGATIVE])
    with pytest.raises(TypeError, match="cond must come from ZImageModel.condition"):
        model.velocity(torch.zeros(1, 16, 8, 8), 0.5, object())


def test_condition_is_cached(model):
    a = model.condition(PROMPT, NEGATIVE, 3.0, max_sequence_length=SEQ)
    assert model.condition(PROMPT, NEGATIVE, 3.0, max_sequence_length=SEQ) is a
    assert isinstance(a, ZImageCondition) and a.batch_size == 1
    unconditional = model.condition(guidance_scale=0.0, max_sequence_length=SEQ)
    assert unconditional.batch_size == 1 and unconditional.negative_prompt_embeds is None
