"""RF-Inversion against float64 transcriptions of the official loops, its exact properties, refusals and presets.

The official code: huggingface/diffusers commit 0036ae2a3c13f86747eab1fb91e452110f57e121,
examples/community/pipeline_flux_rf_inversion.py (``invert``, the controlled forward ODE, and ``get_timesteps``),
and LituRout/RF-Inversion commit 7692b96a8696f3f877fe143e41559be6620a6cd4, pipeline_rf_inversion_sde.py
(``RFInversionFluxPipelineSDE.__call__``, the controlled reverse ODE / SDE, which is the community ``__call__`` plus
the SDE and the decay of eta). The transcriptions below keep the official arithmetic in float64, in the official
time and sign (t = 1 - s in the reverse loop, v_t = -noise_pred), on packed FLUX tokens, with the network outputs
from the tiny pipelines' own transformers called as the official code calls them; flowsteer keeps its state in
float32. Noise: both draw y1 and then each stochastic step's noise from the same generator (the official code's
torch.randn_like draws from the global generator instead). Prompts are encoded with 32 T5 tokens for speed.
"""

import copy
import inspect

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch.utils._python_dispatch import TorchDispatchMode

from guidance import sample
from guidance.features.presets import get_preset, list_presets
from guidance.inversion import invert
from guidance.methods.rf_inversion import PRESETS, QUIRKS, _conditions, rf_inversion
from guidance.sampler import start_step
from tiny_models import NEGATIVE, PROMPT

pytestmark = pytest.mark.usefixtures("one_thread")

EDIT = "a tomato"
SEQ = 32  # T5 tokens of the FLUX prompts
# float32 state against the float64 transcription, 4-5 steps of tiny FLUX / SD3 (latents up to about 2): measured
# 2.9e-7 (FLUX, community ODE), 2.5e-7 (FLUX, SDE), 3.4e-7 (FLUX, Algorithm 1), 9.3e-7 (SD3 with CFG 7); the
# mutations below miss by 0.36 to 3.8
TOLERANCE = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(size: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=_gen(seed)) * 2 - 1


# -- the transcription ---------------------------------------------------------------------------------------------

def official_schedule(pipe, num_steps: int, strength: float, size: int):
    """retrieve_timesteps + get_timesteps of the community pipeline: (timesteps, sigmas) from the strength's start.
    FLUX: linspace(1, 1/N, N) shifted with mu from the token count, as the community pipeline; SD3: the scheduler's
    own set_timesteps(N) with its static shift, as StableDiffusion3Pipeline."""
    scheduler = copy.deepcopy(pipe.scheduler)
    config = scheduler.config
    if config.use_dynamic_shifting:
        tokens = (size // pipe.vae_scale_factor // 2) ** 2
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
    else:
        scheduler.set_timesteps(num_steps, device="cpu")
    init_timestep = min(num_steps * strength, num_steps)
    t_start = int(max(num_steps - init_timestep, 0))
    return scheduler.timesteps[t_start:], scheduler.sigmas[t_start:]


class FluxNetwork:
    """The tiny FLUX transformer as the official loops call it, on packed float64 tokens: ``__call__(latents,
    timestep, which)`` with ``timestep`` the float32 noise level the official code passes."""

    def __init__(self, pipe, size: int, prompts: dict, guidance: dict):
        self.pipe, self.guidance = pipe, guidance
        self.h = self.w = size // pipe.vae_scale_factor
        self.channels = pipe.transformer.config.in_channels // 4
        self.img_ids = pipe._prepare_latent_image_ids(1, self.h // 2, self.w // 2, "cpu", torch.float32)
        self.texts = {which: pipe.encode_prompt(prompt=p, prompt_2=p, device="cpu", max_sequence_length=SEQ)
                      for which, p in prompts.items()}

    def pack(self, latent: torch.Tensor) -> torch.Tensor:
        return self.pipe._pack_latents(latent, latent.shape[0], self.channels, self.h, self.w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pipe._unpack_latents(tokens, self.h * self.pipe.vae_scale_factor, self.w * self.pipe.vae_scale_factor,
                                         self.pipe.vae_scale_factor)

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, which: str) -> torch.Tensor:
        embeds, pooled, text_ids = self.texts[which]
        return self.pipe.transformer(
            hidden_states=latents.float(), timestep=timestep.reshape(1), guidance=torch.full([1], self.guidance[which]),
            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=self.img_ids,
            return_dict=False)[0].double()


class SD3Network:
    """The tiny SD3 transformer as StableDiffusion3Pipeline calls it (timestep = 1000 s, CFG on a [negative,
    positive] batch when the scale exceeds 1), float64 outside."""

    def __init__(self, pipe, prompts: dict, guidance: dict):
        self.pipe, self.guidance = pipe, guidance
        self.texts = {which: pipe.encode_prompt(prompt=p, prompt_2=None, prompt_3=None, device="cpu",
                                                do_classifier_free_guidance=guidance[which] > 1)
                      for which, p in prompts.items()}

    def pack(self, latent):
        return latent

    unpack = pack

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, which: str) -> torch.Tensor:
        pos, neg, pooled, neg_pooled = self.texts[which]
        w = self.guidance[which]
        hidden, t = latents.float(), (timestep * 1000).reshape(1)
        if w <= 1:
            return self.pipe.transformer(hidden_states=hidden, timestep=t, encoder_hidden_states=pos,
                                         pooled_projections=pooled, return_dict=False)[0].double()
        out = self.pipe.transformer(hidden_states=torch.cat([hidden, hidden]), timestep=t.expand(2),
                                    encoder_hidden_states=torch.cat([neg, pos]),
                                    pooled_projections=torch.cat([neg_pooled, pooled]), return_dict=False)[0].double()
        v_u, v_c = out.chunk(2)
        return v_u + w * (v_c - v_u)


@torch.no_grad()
def transcription(network, pipe, image, *, num_steps, gamma, eta, start_timestep, stop_timestep, strength=1.0,
                  decay_eta=False, eta_decay_power=1.0, enable_sde=False, forward="community",
                  noisy_last_step=True, seed=0):
    """(edited latent, inverted latent), unpacked, float64. ``forward="community"``: ``invert`` as written;
    ``"algorithm1"``: Algorithm 1 of the paper on the model's schedule read upward (t_i the state's level,
    the step to the next level up). ``noisy_last_step=False``: flowsteer's deterministic SDE step onto s = 0."""
    # encode_image: latent_dist.sample() in the official code (unseeded); flowsteer encodes the mean
    vae = pipe.vae
    x0 = vae.encode(image).latent_dist.mean
    x0 = ((x0 - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).double()
    image_latents = network.pack(x0)
    gen = _gen(seed)

    def draw():
        return network.pack(torch.randn(x0.shape, generator=gen).double())

    timesteps, sigmas = official_schedule(pipe, num_steps, strength, image.shape[-1])

    # invert: Eq 8 dY_t = [u_t(Y_t) + γ(u_t(Y_t|y_1) - u_t(Y_t))]dt
    Y_t = image_latents
    y_1 = draw()
    N = len(sigmas)
    if forward == "community":
        for i in range(N - 1):
            t_i = torch.tensor(i / N, dtype=torch.float32)
            u_t_i = network(Y_t, t_i, "source")
            u_t_i_cond = (y_1 - Y_t) / (1 - t_i.double())
            u_hat_t_i = u_t_i + gamma * (u_t_i_cond - u_t_i)
            Y_t = Y_t + u_hat_t_i * (sigmas[i] - sigmas[i + 1]).double()
    else:
        levels = sigmas.flip(0)  # 0 = t_0 < t_1 < ... : Algorithm 1's grid
        for i in range(N - 1):
            t_i, t_next = levels[i], levels[i + 1]
            u_t_i = network(Y_t, t_i, "source")
            u_t_i_cond = (y_1 - Y_t) / (1 - t_i.double())
            u_hat_t_i = u_t_i + gamma * (u_t_i_cond - u_t_i)
            Y_t = Y_t + u_hat_t_i * (t_next - t_i).double()
    inverted = Y_t

    # __call__: Controlled Reverse ODE, Algorithm 2 (SDE: Eq. 17)
    start_timestep = int(start_timestep * num_steps)
    stop_timestep = min(int(stop_timestep * num_steps), num_steps)
    num_inference_steps = len(timesteps)
    latents, y_0 = inverted, image_latents.clone()
    sigmas = sigmas.double()
    for i, t in enumerate(timesteps):
        t_i = 1 - t.double() / 1000
        noise_pred = network(latents, t / 1000, "edit")
        v_t = -noise_pred
        v_t_cond = (y_0 - latents) / (1 - t_i)
        eta_t = eta if start_timestep <= i < stop_timestep else 0.0
        if decay_eta:
            eta_t = eta_t * (1 - i / num_inference_steps) ** eta_decay_power
        v_hat_t = v_t + eta_t * (v_t_cond - v_t)
        if not enable_sde or (not noisy_last_step and sigmas[i + 1] == 0):
            latents = latents + v_hat_t * (sigmas[i] - sigmas[i + 1])
        else:
            if i == 0:
                drift = v_hat_t
                diffusion_coeff = 0
            else:
                drift = 2 * v_hat_t - latents / (1 - sigmas[i])
                diffusion_coeff = (2 * sigmas[i] / (1 - sigmas[i]) * (sigmas[i] - sigmas[i + 1])).sqrt()
            # the official code draws a noise on the first step too and multiplies it by 0; flowsteer draws none there
            noise = draw() if i > 0 else 0.0
            latents = latents + (sigmas[i] - sigmas[i + 1]) * drift + diffusion_coeff * noise
    return network.unpack(latents), network.unpack(inverted)


def _flux_network(flux, size=64):
    return FluxNetwork(flux.pipeline, size, {"source": "", "edit": EDIT}, {"source": 0.0, "edit": 3.5})


def _flux_run(flux, **options):
    """flowsteer on tiny FLUX with the conditions of the transcription (source "" at guidance 0, edit 3.5)."""
    conds = {"source_prompt": flux.condition("", guidance_scale=0.0, max_sequence_length=SEQ),
             "edit_prompt": flux.condition(EDIT, guidance_scale=3.5, max_sequence_length=SEQ)}
    return rf_inversion(flux, source_image=_image(64), generator=_gen(0), progress=False, decode=False,
                        **{**conds, **options})


def _gap(result, reference) -> float:
    edited, inverted = reference
    return max(float((result.x.double() - edited).abs().max()),
               float((result.info["inverted"].double() - inverted).abs().max()))


# -- parity ----------------------------------------------------------------------------------------------------------

def test_flux_ode_matches_the_community_pipeline(flux):
    """(a) official_quirks=True against invert + __call__ as written: 4 steps, the example's stop 7/28 (step 1)."""
    net = _flux_network(flux)
    reference = transcription(net, flux.pipeline, _image(64), num_steps=4, gamma=0.5, eta=0.9, start_timestep=0,
                              stop_timestep=7 / 28)
    result = _flux_run(flux, num_steps=4, official_quirks=True)
    assert result.nfe == 8 and result.info["eta"] == [0.9, 0.0, 0.0, 0.0]
    assert _gap(result, reference) < TOLERANCE
    # mutations: flowsteer's own forward grid, and a window one step longer, miss by far more than the tolerance
    assert _gap(_flux_run(flux, num_steps=4), reference) > 100 * TOLERANCE
    assert _gap(_flux_run(flux, num_steps=4, official_quirks=True, stop_step=2), reference) > 100 * TOLERANCE


def test_flux_sde_matches_the_repository(flux):
    """(b) the SDE (enable_sde) with the decay of eta and strength < 1, official_quirks=True: noise on the last step."""
    net = _flux_network(flux)
    options = dict(gamma=0.6, eta=0.8, decay_eta=True, eta_decay_power=2.0, strength=0.8)
    reference = transcription(net, flux.pipeline, _image(64), num_steps=5, start_timestep=0.2, stop_timestep=0.8,
                              enable_sde=True, **options)
    result = _flux_run(flux, num_steps=5, start_step=1, stop_step=4, stochastic=True, official_quirks=True, **options)
    assert start_step(5, 0.8) == 1 and result.nfe == 8 and len(result.sigmas) == 5
    assert _gap(result, reference) < TOLERANCE
    # flowsteer's deterministic last step, or no decay, miss by far more than the tolerance
    mutated = _flux_run(flux, num_steps=5, start_step=1, stop_step=4, stochastic=True, **options)
    assert _gap(mutated, reference) > 100 * TOLERANCE
    options["decay_eta"], options["eta_decay_power"] = False, 1.0
    mutated = _flux_run(flux, num_steps=5, start_step=1, stop_step=4, stochastic=True, official_quirks=True, **options)
    assert _gap(mutated, reference) > 100 * TOLERANCE


def test_flowsteer_forward_matches_algorithm_1_on_flux(flux):
    """(c) flowsteer's own computation (no quirks): Algorithm 1 on the schedule read upward, then the reverse ODE
    and SDE with a deterministic last step."""
    net = _flux_network(flux)
    for stochastic in (False, True):
        reference = transcription(net, flux.pipeline, _image(64), num_steps=4, gamma=0.5, eta=0.9, start_timestep=0,
                                  stop_timestep=0.5, forward="algorithm1", enable_sde=stochastic,
                                  noisy_last_step=False)
        result = _flux_run(flux, num_steps=4, stop_step=2, stochastic=stochastic)
        assert _gap(result, reference) < TOLERANCE
    mutated = _flux_run(flux, num_steps=4, stop_step=2, stochastic=True, official_quirks=True)
    assert _gap(mutated, reference) > 100 * TOLERANCE


def test_flowsteer_matches_the_transcription_on_sd3_with_text_prompts(sd3):
    """Tiny SD3 from text, with the defaults: the source without CFG, the edit with SD3's own CFG 7."""
    net = SD3Network(sd3.pipeline, {"source": "", "edit": EDIT}, {"source": 1.0, "edit": 7.0})
    reference = transcription(net, sd3.pipeline, _image(32), num_steps=4, gamma=0.5, eta=0.9, start_timestep=0,
                              stop_timestep=0.5, forward="algorithm1")
    result = rf_inversion(sd3, source_image=_image(32), edit_prompt=EDIT, num_steps=4, stop_step=2, generator=_gen(0),
                          progress=False)
    assert result.nfe == 8 and result.image.shape == (1, 3, 32, 32) and torch.isfinite(result.image).all()
    assert _gap(result, reference) < TOLERANCE


# -- exact properties ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stochastic", [False, True])
def test_eta_one_on_every_step_lands_on_the_source_latent(sd3, stochastic):
    """X - y0 shrinks by s_{i+1} / s_i per step, so the last step (deterministic also with the SDE) ends on y0."""
    result = rf_inversion(sd3, source_image=_image(32), source_prompt=PROMPT, edit_prompt=EDIT, num_steps=4, eta=1.0,
                          stop_step=4, stochastic=stochastic, generator=_gen(1), progress=False, decode=False)
    assert result.nfe == 8
    y0 = result.info["source_latent"]
    assert float((result.x - y0).abs().max()) < 1e-5 < float((result.info["inverted"] - y0).abs().max())


def test_gamma_and_eta_zero_are_plain_euler_inversion_and_sampling(sd3):
    cond_src, cond_edit = sd3.condition(PROMPT, guidance_scale=1.0), sd3.condition(EDIT, NEGATIVE, 4.0)
    result = rf_inversion(sd3, source_image=_image(32), source_prompt=cond_src, edit_prompt=cond_edit, num_steps=4,
                          gamma=0.0, eta=0.0, generator=_gen(2), progress=False, decode=False)
    inverted = invert(sd3, cond=cond_src, latents=result.info["source_latent"], num_steps=4, progress=False).noise
    assert torch.allclose(result.info["inverted"], inverted, atol=1e-6, rtol=0)
    sampled = sample(sd3, cond_edit, num_steps=4, latents=result.info["inverted"], progress=False, decode=False).x
    assert torch.allclose(result.x, sampled, atol=1e-6, rtol=0)


def test_a_batch_with_one_generator_per_image_equals_the_single_runs(sd3):
    images = torch.cat([_image(32, 3), _image(32, 4)])
    both = rf_inversion(sd3, source_image=images, edit_prompt=EDIT, guidance_scale=1.0, num_steps=3,
                        stochastic=True, generator=[_gen(5), _gen(6)], progress=False, decode=False)
    assert both.x.shape == (2, 4, 4, 4) and both.nfe == 6
    for k, seed in enumerate((5, 6)):
        one = rf_inversion(sd3, source_image=images[k:k + 1], edit_prompt=EDIT, guidance_scale=1.0, num_steps=3,
                           stochastic=True, generator=_gen(seed), progress=False, decode=False)
        assert torch.allclose(both.x[k], one.x[0], atol=1e-5)


def test_default_guidance_by_family(flux, sd3):
    src, edit = _conditions(flux, None, EDIT, None, None)
    assert (src.guidance_scale, edit.guidance_scale) == (0.0, 3.5)  # the community invert's 0.0, the pipeline's 3.5
    src, edit = _conditions(sd3, None, EDIT, None, None)
    assert (src.guidance_scale, edit.guidance_scale) == (1.0, 7.0)  # CFG off along the inversion, SD3's own CFG 7
    src, edit = _conditions(sd3, None, EDIT, 2.0, 1.0)
    assert (src.guidance_scale, edit.guidance_scale) == (2.0, 1.0)


def test_the_default_window_is_the_examples_7_of_28_and_the_callbacks_see_each_reverse_step(sd3):
    seen, ends = [], []
    result = rf_inversion(sd3, source_image=_image(32), edit_prompt=EDIT, guidance_scale=1.0, num_steps=8,
                          generator=_gen(0), progress=False, decode=False, callback=lambda d: seen.append(d["step"]),
                          on_step_end=lambda i, s, state: ends.append(i) or state)
    assert result.info["eta"] == [0.9, 0.9] + [0.0] * 6  # int(8 * 7 / 28) = 2
    assert seen == ends == list(range(8))


def test_the_reverse_loop_reads_nothing_back_from_the_device(sd3):
    """No .item(), bool(tensor) or float(tensor) between the first and the last reverse step (the divergence check
    reads once after the loop)."""
    reads, marks = [], []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with HostReads():
        rf_inversion(sd3, source_image=_image(32), edit_prompt=EDIT, num_steps=4, stop_step=3, stochastic=True,
                     generator=_gen(0), progress=False, decode=False, callback=lambda d: marks.append(len(reads)))
    assert len(marks) == 4 and marks[-1] == marks[0]


# -- refusals --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"objective": object()}, "takes no objective"),
    ({"cond": object()}, "leave cond=None"),
    ({"latents": torch.zeros(1, 4, 4, 4)}, "starts its reverse process from the inverted source"),
    ({"mask": torch.ones(32, 32)}, r"flowedit\(mask=...\)"),
    ({"gamma": 1.5}, "gamma must be a number <= 1"),
    ({"eta": -0.1}, "eta must be a number >= 0"),
    ({"start_step": 3, "stop_step": 2}, "start_step=3 is after stop_step=2"),
    ({"stop_step": 5}, "stop_step=5 lies beyond the 4 steps"),
    ({"strength": 0.0}, "strength must be a number > 0"),
    ({"strength": 1.5}, "strength must be a number <= 1"),
    ({"eta_decay_power": 2.0}, "has no effect without decay_eta=True"),
    ({"decay_eta": "yes"}, "decay_eta must be True or False"),
    ({"stochastic": True}, "pass an explicit generator"),
    ({"source_image": None}, "needs source_image"),
    ({"edit_prompt": None}, "needs edit_prompt"),
    ({"source_image": torch.zeros(2, 3, 32, 32), "edit_prompt": [EDIT] * 3}, "source_image has batch 2 but 3"),
])
def test_refusals(sd3, options, message):
    arguments = {"source_image": _image(32), "edit_prompt": EDIT, "num_steps": 4, "progress": False, **options}
    with pytest.raises(ValueError, match=message):
        rf_inversion(sd3, **arguments)


def test_a_guidance_scale_with_a_condition_and_a_text_free_model_are_refused(sd3):
    from tasks.studies.analytic_benchmark import smooth_image_prior

    with pytest.raises(ValueError, match="guidance_scale=4.0 applies to a text edit_prompt"):
        rf_inversion(sd3, source_image=_image(32), edit_prompt=sd3.condition(EDIT), guidance_scale=4.0, progress=False)
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        rf_inversion(smooth_image_prior(shape=(3, 4, 4), components=2), source_image=torch.zeros(1, 3, 4, 4),
                     edit_prompt=EDIT, progress=False)


# -- presets ---------------------------------------------------------------------------------------------------------

def test_presets_carry_the_published_example():
    for name, sde in (("rf_inversion_flux", False), ("rf_inversion_flux_sde", True)):
        preset = PRESETS[name]
        assert preset["model"] == "black-forest-labs/FLUX.1-dev" and preset["dtype"] == "bfloat16"
        assert (preset["num_steps"], preset["resolution"], preset["method"]) == (28, 1024, "rf_inversion")
        assert preset["options"] == {"gamma": 0.5, "eta": 0.9, "start_step": 0, "stop_step": 7, "strength": 1.0,
                                     "source_guidance_scale": 0.0, "guidance_scale": 3.5, "stochastic": sde}
        assert preset["objective"] is None and preset["operators"] is None
        assert "7692b96a8696f3f877fe143e41559be6620a6cd4" in preset["source"]
        assert "0036ae2a3c13f86747eab1fb91e452110f57e121" in preset["source"]
        assert preset["parity"] == {"options": {"official_quirks": True}}
        assert set(preset["quirks"]) <= set(QUIRKS)
        assert set(preset["options"]) <= set(inspect.signature(rf_inversion).parameters)
    assert "sde_noise_on_last_step" in PRESETS["rf_inversion_flux_sde"]["quirks"]
    if "rf_inversion_flux" in list_presets():  # once registered in guidance.features.presets
        assert get_preset("rf_inversion_flux", official_quirks=True)["options"]["official_quirks"] is True
