"""FlowEdit against a float64 transcription of the official loops, its identity and masked properties, its defaults
by family, its refusals and its presets.

The official code is fallenshock/FlowEdit at commit 457f40239845d41391ef04d294bb0f1c02525fcf (Kulikov et al.,
"FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models", ICCV 2025): ``FlowEditSD3`` and
``FlowEditFLUX`` in FlowEdit_utils.py, the encoding in run_script.py, the settings in SD3_exp.yaml and
FLUX_exp.yaml. The transcriptions below keep their state and arithmetic in float64 and take the network outputs
from the tiny pipelines' own transformers called as the official code calls them (SD3: one batch of four with the
scheduler's timestep t; FLUX: packed tokens, two calls, timestep t / 1000 and the guidance tensor); their noise is
replayed from the generator flowsteer draws from, one ``torch.randn`` of the latent shape per draw.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from tiny_models import PROMPT

import guidance.methods.flowedit as flowedit_module
from guidance.methods.flowedit import PRESETS, default_guidance_scales, default_n_max, flowedit

pytestmark = pytest.mark.usefixtures("one_thread")

EDIT_PROMPT = "a white cat in the city"
NUM_STEPS, N_MAX = 4, 3
# float32 state and network inputs against the float64 transcription (measured: 2.1e-6 for SD3 with CFG 3.5 / 13.5,
# 5.2e-7 with n_min 1 and n_avg 2, 3.0e-7 and 3.1e-7 for FLUX; the mutations below move it by 8e-2 or more)
TOLERANCE = 1e-5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _image(size, seed=5, batch=1):
    return torch.rand(batch, 3, size, size, generator=_gen(seed)) * 2 - 1


def _official_source(pipe, image):
    """run_script.py: the posterior mode of the VAE, shifted and scaled."""
    with torch.no_grad():
        latent = pipe.vae.encode(image).latent_dist.mode()
    return (latent - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def _noise(seed, shape):
    """The official torch.randn_like(x_src) of each draw, replayed from flowsteer's generator in float64."""
    generator = _gen(seed)
    return lambda: torch.randn(shape, generator=generator).double()


# -- the transcriptions ---------------------------------------------------------------------------------------------

@torch.no_grad()
def official_sd3(pipe, x_src, src_prompt, tar_prompt, negative_prompt, T_steps, n_avg, src_guidance_scale,
                 tar_guidance_scale, n_min, n_max, draw):
    """FlowEditSD3 with classifier-free guidance, in float64; its n_min > 0 branch as intended (its undefined
    noise_pred_tar removed: the state stays float64)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    timesteps, T_steps = retrieve_timesteps(scheduler, T_steps, "cpu")
    src_embeds, src_negative, src_pooled, src_negative_pooled = pipe.encode_prompt(
        prompt=src_prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
        do_classifier_free_guidance=True, device="cpu")
    tar_embeds, tar_negative, tar_pooled, tar_negative_pooled = pipe.encode_prompt(
        prompt=tar_prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
        do_classifier_free_guidance=True, device="cpu")
    embeds = torch.cat([src_negative, src_embeds, tar_negative, tar_embeds])
    pooled = torch.cat([src_negative_pooled, src_pooled, tar_negative_pooled, tar_pooled])

    def calc_v_sd3(latent_model_input, t):
        out = pipe.transformer(hidden_states=latent_model_input.float(), timestep=t.expand(4),
                               encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        src_uncond, src_text, tar_uncond, tar_text = out.double().chunk(4)
        return (src_uncond + src_guidance_scale * (src_text - src_uncond),
                tar_uncond + tar_guidance_scale * (tar_text - tar_uncond))

    x_src = x_src.double()
    zt_edit = x_src.clone()
    for i, t in enumerate(timesteps):
        if T_steps - i > n_max:
            continue
        t_i = t.double() / 1000
        t_im1 = timesteps[i + 1].double() / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
        if T_steps - i > n_min:
            V_delta_avg = torch.zeros_like(x_src)
            for _ in range(n_avg):
                fwd_noise = draw()
                zt_src = (1 - t_i) * x_src + t_i * fwd_noise
                zt_tar = zt_edit + zt_src - x_src
                Vt_src, Vt_tar = calc_v_sd3(torch.cat([zt_src, zt_src, zt_tar, zt_tar]), t)
                V_delta_avg += (1 / n_avg) * (Vt_tar - Vt_src)
            zt_edit = zt_edit + (t_im1 - t_i) * V_delta_avg
        else:
            if i == T_steps - n_min:
                fwd_noise = draw()
                scheduler._init_step_index(t)  # scale_noise
                sigma = scheduler.sigmas[scheduler.step_index].double()
                xt_src = sigma * fwd_noise + (1.0 - sigma) * x_src
                xt_tar = zt_edit + xt_src - x_src
            _, Vt_tar = calc_v_sd3(torch.cat([xt_tar, xt_tar, xt_tar, xt_tar]), t)
            xt_tar = xt_tar + (t_im1 - t_i) * Vt_tar
    return zt_edit if n_min == 0 else xt_tar


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.16):
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@torch.no_grad()
def official_flux(pipe, x_src, src_prompt, tar_prompt, T_steps, n_avg, src_guidance_scale, tar_guidance_scale,
                  n_min, n_max, draw, height, width, max_sequence_length=32):
    """FlowEditFLUX in float64 (prompts encoded with max_sequence_length 32 instead of 512, for speed; the image
    ids of diffusers 0.30's prepare_latents, the size the README pins)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    batch, channels, h, w = x_src.shape
    pack = lambda z: pipe._pack_latents(z, batch, channels, h, w)  # noqa: E731
    latent_image_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32)
    x_src_packed = pack(x_src.double())
    sigmas = np.linspace(1.0, 1 / T_steps, T_steps)
    config = scheduler.config
    mu = calculate_shift(x_src_packed.shape[1], config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    timesteps, T_steps = retrieve_timesteps(scheduler, T_steps, "cpu", sigmas=sigmas, mu=mu)
    src_embeds, src_pooled, src_text_ids = pipe.encode_prompt(
        prompt=src_prompt, prompt_2=None, device="cpu", max_sequence_length=max_sequence_length)
    tar_embeds, tar_pooled, tar_text_ids = pipe.encode_prompt(
        prompt=tar_prompt, prompt_2=None, device="cpu", max_sequence_length=max_sequence_length)
    src_guidance = torch.tensor([src_guidance_scale]).expand(batch)
    tar_guidance = torch.tensor([tar_guidance_scale]).expand(batch)

    def calc_v_flux(latents, prompt_embeds, pooled_prompt_embeds, guidance, text_ids, t):
        return pipe.transformer(hidden_states=latents.float(), timestep=t.expand(batch) / 1000, guidance=guidance,
                                encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=latent_image_ids,
                                pooled_projections=pooled_prompt_embeds, return_dict=False)[0].double()

    zt_edit = x_src_packed.clone()
    for i, t in enumerate(timesteps):
        if T_steps - i > n_max:
            continue
        scheduler._init_step_index(t)
        t_i = scheduler.sigmas[scheduler.step_index].double()
        t_im1 = scheduler.sigmas[scheduler.step_index + 1].double()
        if T_steps - i > n_min:
            V_delta_avg = torch.zeros_like(x_src_packed)
            for _ in range(n_avg):
                fwd_noise = pack(draw())
                zt_src = (1 - t_i) * x_src_packed + t_i * fwd_noise
                zt_tar = zt_edit + zt_src - x_src_packed
                Vt_src = calc_v_flux(zt_src, src_embeds, src_pooled, src_guidance, src_text_ids, t)
                Vt_tar = calc_v_flux(zt_tar, tar_embeds, tar_pooled, tar_guidance, tar_text_ids, t)
                V_delta_avg += (1 / n_avg) * (Vt_tar - Vt_src)
            zt_edit = zt_edit + (t_im1 - t_i) * V_delta_avg
        else:
            if i == T_steps - n_min:
                fwd_noise = pack(draw())
                xt_src = t_i * fwd_noise + (1.0 - t_i) * x_src_packed  # scale_noise at this step's sigma
                xt_tar = zt_edit + xt_src - x_src_packed
            Vt_tar = calc_v_flux(xt_tar, tar_embeds, tar_pooled, tar_guidance, tar_text_ids, t)
            xt_tar = xt_tar + (t_im1 - t_i) * Vt_tar
    out = zt_edit if n_min == 0 else xt_tar
    return pipe._unpack_latents(out, height, width, pipe.vae_scale_factor)


# -- parity -------------------------------------------------------------------------------------------------------

SD3_CASES = {"n_min 0": dict(n_min=0, n_avg=1, src=3.5, tar=13.5), "n_min 1, n_avg 2": dict(n_min=1, n_avg=2,
                                                                                           src=2.0, tar=6.0)}


@pytest.mark.parametrize("case", SD3_CASES)
def test_sd3_matches_the_official_loop(sd3, case, monkeypatch):
    c = SD3_CASES[case]
    image, seed = _image(32), 11
    x_src = _official_source(sd3.pipeline, image)
    official = official_sd3(sd3.pipeline, x_src, PROMPT, EDIT_PROMPT, "", NUM_STEPS, c["n_avg"], c["src"], c["tar"],
                            c["n_min"], N_MAX, _noise(seed, tuple(x_src.shape)))
    run = dict(source_image=image, source_prompt=PROMPT, edit_prompt=EDIT_PROMPT, num_steps=NUM_STEPS, n_max=N_MAX,
               n_min=c["n_min"], n_avg=c["n_avg"], source_guidance_scale=c["src"], guidance_scale=c["tar"],
               progress=False, decode=False)
    out = flowedit(sd3, generator=_gen(seed), **run)
    assert torch.equal(out.info["source_latent"], x_src)
    error = (out.x.double() - official).abs().max().item()
    assert error < TOLERANCE, error
    assert (out.x.double() - x_src.double()).abs().max() > 1e3 * TOLERANCE  # the edit moved the latent
    assert out.nfe == 2 * c["n_avg"] * (N_MAX - c["n_min"]) + c["n_min"]
    # mutations: one step more; the data-time interpolation x_t = t x0 + (1 - t) eps of the PnP-Flow codebase
    wrong = flowedit(sd3, generator=_gen(seed), **{**run, "n_max": N_MAX + 1})
    assert (wrong.x.double() - official).abs().max() > 100 * TOLERANCE
    monkeypatch.setattr(flowedit_module, "interpolate", lambda x0, eps, s: s * x0 + (1 - s) * eps)
    wrong = flowedit(sd3, generator=_gen(seed), **run)
    assert (wrong.x.double() - official).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("n_min", [0, 1])
def test_flux_matches_the_official_loop(flux, n_min, monkeypatch):
    image, seed, size = _image(64), 3, 64
    x_src = _official_source(flux.pipeline, image)
    official = official_flux(flux.pipeline, x_src, PROMPT, EDIT_PROMPT, NUM_STEPS, 1, 1.5, 5.5, n_min, N_MAX,
                             _noise(seed, tuple(x_src.shape)), size, size)
    src = flux.condition(PROMPT, guidance_scale=1.5, max_sequence_length=32)
    edit = flux.condition(EDIT_PROMPT, guidance_scale=5.5, max_sequence_length=32)
    run = dict(source_image=image, source_prompt=src, edit_prompt=edit, num_steps=NUM_STEPS, n_max=N_MAX,
               n_min=n_min, progress=False, decode=False)
    out = flowedit(flux, generator=_gen(seed), **run)
    assert torch.equal(out.info["source_latent"], x_src)
    error = (out.x.double() - official).abs().max().item()
    assert error < TOLERANCE, error
    assert (out.x.double() - x_src.double()).abs().max() > 1e3 * TOLERANCE
    # mutation: the source and edit velocities swapped (ΔV of the wrong sign)
    swapped = flowedit(flux, generator=_gen(seed), **{**run, "source_prompt": edit, "edit_prompt": src})
    assert (swapped.x.double() - official).abs().max() > 100 * TOLERANCE


def test_a_list_of_generators_edits_each_image_with_its_own_noise(sd3):
    run = dict(source_image=_image(32), source_prompt=PROMPT, edit_prompt=EDIT_PROMPT, num_steps=NUM_STEPS,
               n_max=N_MAX, n_min=1, progress=False, decode=False)
    both = flowedit(sd3, generator=[_gen(1), _gen(2)], **run)
    assert both.x.shape[0] == 2 and both.info["source_latent"].shape[0] == 1
    for k, seed in enumerate((1, 2)):
        alone = flowedit(sd3, generator=_gen(seed), **run)
        torch.testing.assert_close(both.x[k:k + 1], alone.x, rtol=0, atol=TOLERANCE)


# -- identity and mask ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_identical_prompts_and_scales_return_the_source_latent_exactly(sd3, masked):
    mask = torch.zeros(32, 32)
    mask[4:20, 8:30] = 1
    out = flowedit(sd3, source_image=_image(32), source_prompt=PROMPT, edit_prompt=PROMPT, num_steps=NUM_STEPS,
                   source_guidance_scale=4.0, guidance_scale=4.0, mask=mask if masked else None,
                   generator=_gen(0), progress=False)
    assert torch.equal(out.x, out.info["source_latent"])
    assert torch.equal(out.image, sd3.decode(out.info["source_latent"]))


@pytest.mark.parametrize("n_min", [0, 2])
def test_a_masked_edit_keeps_the_source_latent_outside_the_mask(sd3, n_min):
    mask = torch.zeros(32, 32)
    mask[:, 5:19] = 1  # latent columns 0 (3/8 edited), 1 (all), 2 (3/8); column 3 untouched
    seen = []
    out = flowedit(sd3, source_image=_image(32), source_prompt=PROMPT, edit_prompt=EDIT_PROMPT, num_steps=NUM_STEPS,
                   n_max=N_MAX, n_min=n_min, mask=mask, generator=_gen(4), progress=False, decode=False,
                   callback=seen.append)
    M = out.info["edit_mask"]
    assert M.shape == (1, 1, 4, 4) and torch.equal(M[0, 0, 0], torch.tensor([0.375, 1.0, 0.375, 0.0]))
    x_src = out.info["source_latent"]
    assert torch.equal(out.x[..., 3], x_src[..., 3])
    assert (out.x[..., :3] - x_src[..., :3]).abs().amax(dim=(0, 1, 2)).min() > 1e-3
    assert [e["step"] for e in seen] == [1, 2, 3] and all(torch.equal(e["delta_v"][..., 3], torch.zeros_like(
        e["delta_v"][..., 3])) for e in seen if "delta_v" in e)


# -- defaults and options -----------------------------------------------------------------------------------------

def test_the_defaults_follow_the_family(sd3, flux):
    assert [default_n_max(sd3, n) for n in (50, 28, 25, 4, 1)] == [33, 18, 17, 3, 1]  # 33/50, half up
    assert [default_n_max(flux, n) for n in (28, 14, 4, 1)] == [24, 12, 3, 1]  # 24/28
    assert default_guidance_scales(sd3) == (3.5, 13.5) and default_guidance_scales(flux) == (1.5, 5.5)
    out = flowedit(sd3, source_image=_image(32), source_prompt=PROMPT, edit_prompt=EDIT_PROMPT, num_steps=3,
                   generator=_gen(0), progress=False, decode=False)
    info = out.info
    assert (info["n_max"], info["n_min"], info["steps"]) == (2, 0, [1, 2]) and out.nfe == 4
    assert (info["source_guidance_scale"], info["guidance_scale"]) == (3.5, 13.5) and info["edit_mask"] is None
    explicit = flowedit(sd3, source_image=_image(32), source_prompt=PROMPT, edit_prompt=EDIT_PROMPT, num_steps=3,
                        n_max=2, source_guidance_scale=3.5, guidance_scale=13.5, generator=_gen(0),
                        progress=False, decode=False)
    assert torch.equal(explicit.x, out.x)


class TextFreeModel:
    """A text-free latent model: it answers condition() but takes no prompt."""

    takes_text = False
    spatial_factor = 8
    device = torch.device("cpu")

    def velocity(self, x, sigma, cond=None):
        return torch.zeros_like(x)

    def condition(self, *args, **kwargs):
        return object()


def test_refusals(sd3):
    run = dict(source_image=_image(32), source_prompt=PROMPT, edit_prompt=EDIT_PROMPT, num_steps=NUM_STEPS,
               progress=False)
    cases = [
        (dict(objective=object()), "takes no objective"),
        (dict(cond=sd3.condition(PROMPT)), "leave cond=None"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), "latents has no role"),
        (dict(n_max=0), "n_max must be an integer >= 1"),
        (dict(n_max=NUM_STEPS + 1), "use n_max <= 4"),
        (dict(n_max=2, n_min=3), "use n_min <= 2"),
        (dict(n_min=-1), "n_min must be an integer >= 0"),
        (dict(n_avg=0), "n_avg must be an integer >= 1"),
        (dict(n_avg=1.5), "n_avg must be an integer"),
        (dict(source_guidance_scale=-1.0), "source_guidance_scale must be a number >= 0"),
        (dict(edit_prompt=sd3.condition(EDIT_PROMPT), guidance_scale=5.0), "edit_prompt is a condition"),
        (dict(edit_prompt=None), "needs edit_prompt"),
        (dict(source_image=None), "needs source_image"),
        (dict(mask=torch.ones(16, 16)), "resize the mask"),
        (dict(mask=torch.ones(3, 1, 32, 32), batch_size=2), "mask has batch 3"),
        (dict(num_steps=5000, n_avg=5000), "more than one call takes"),
        (dict(check_divergence="yes"), "check_divergence must be True or False"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            flowedit(sd3, **{**run, **options})
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        flowedit(TextFreeModel(), **run)


# -- presets ------------------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    """SD3_exp.yaml and FLUX_exp.yaml (T_steps, n_avg, src/tar guidance, n_min, n_max, seed), run_script.py (the
    models in float16, negative prompt ""), Data/README.md (1024 x 1024 images)."""
    official = {"flowedit_sd3": (50, 1, 3.5, 13.5, 0, 33, 42, "stabilityai/stable-diffusion-3-medium-diffusers"),
                "flowedit_flux": (28, 1, 1.5, 5.5, 0, 24, 10, "black-forest-labs/FLUX.1-dev")}
    assert set(PRESETS) == set(official)
    for name, (steps, n_avg, src, tar, n_min, n_max, seed, model) in official.items():
        preset = PRESETS[name]
        assert preset["method"] == "flowedit" and preset["objective"] is None and preset["operators"] is None
        assert preset["num_steps"] == steps and (preset["seed"], preset["model"]) == (seed, model)
        assert preset["options"] == {"n_max": n_max, "n_min": n_min, "n_avg": n_avg, "source_guidance_scale": src,
                                     "guidance_scale": tar}
        assert (preset["dtype"], preset["resolution"], preset["negative_prompt"]) == ("float16", 1024, "")
        assert "457f40239845d41391ef04d294bb0f1c02525fcf" in preset["source"] and "Kulikov" in preset["source"]
        assert "edits.yaml" in preset["note"]
