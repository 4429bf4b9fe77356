"""The editing stack built on inversion: RF-Solver editing (and FireFlow's editing with ``solver="fireflow"``)
against float64 transcriptions of the official loops, and inversion_edit's mask, objective, strength and refusals.

Official code: wangjiangshan0725/RF-Solver-Edit commit 3388e29, ``FLUX_Image_Edit/src/edit.py`` (``z =
denoise(model, **inp, timesteps, guidance=1, inverse=True)``, then ``denoise(model, **inp_target, timesteps,
guidance=guidance, inverse=False)``) and ``src/flux/sampling.py`` (``denoise``, ``get_schedule``);
HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing commit 98588a6, ``src/edit.py``
(the same two calls with ``denoise_fireflow``) and ``src/flux/sampling.py`` (``denoise_fireflow``). Their FLUX model
takes t in [0, 1] (our s; it multiplies t and the guidance by 1000 itself, as the diffusers transformer does) and
predicts our v = eps - x0. The transcriptions keep the official arithmetic in float64 on packed FLUX tokens (SD3:
latents, with the pipeline's timestep 1000 s and its CFG combination), calling the tiny pipelines' transformers
as the official code calls its model; flowsteer keeps its state in float32. The source latent is the model's
``encode`` (the posterior mean; edit.py samples the official autoencoder's posterior and casts it to bfloat16).
"""

import math

import pytest
import torch

import guidance
from guidance import CallableObjective
from guidance.features.rewards import make_guide
from guidance.methods.inversion_edit import inversion_edit
from guidance.methods.rf_solver_edit import rf_solver_edit
from guidance.sampler import start_step
from official_rf_loops import denoise

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 32  # T5 tokens of the FLUX prompts
SOURCE, EDIT = "a photo of a cat", "a photo of a dog"
FLUX_GUIDANCE = 2.0  # the official scripts' --guidance on FLUX.1-dev
SD3_GUIDANCE = 5.0
# float32 state against the float64 transcription, 4 steps of tiny FLUX / SD3 (latents up to about 1): measured
# 3.9e-7 / 5.1e-7 (FLUX, rf_solver / fireflow; the inverted noise 5.1e-7 / 5.7e-7) and 9.9e-7 / 1.1e-6 (SD3 with
# CFG 5); the mutations below miss by 0.0087 (SD3, RF-Solver in place of FireFlow) to 0.56
TOLERANCE = 5e-6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(size: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=_gen(seed)) * 2 - 1


# -- the transcription -----------------------------------------------------------------------------------------
def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> list:
    """sampling.py's ``get_schedule`` (shift=True, FLUX.1-dev): linspace(1, 0, N + 1) under the exponential time
    shift with mu linear in the token count between (256, 0.5) and (4096, 1.15)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    mu = base_shift + (max_shift - base_shift) / (4096 - 256) * (image_seq_len - 256)
    timesteps = math.exp(mu) / (math.exp(mu) + (1 / timesteps - 1) ** 1.0)
    return timesteps.tolist()


class FluxNetwork:
    """The tiny FLUX transformer as the official ``Flux`` model is called: packed tokens, t in [0, 1], the
    embedded guidance (1 for the inversion, g for the edit), T5 text and CLIP pooled vector; float64 outside."""

    def __init__(self, pipe, size: int, prompts: dict, guidance_values: dict):
        self.pipe, self.guidance = pipe, guidance_values
        self.h = self.w = size // pipe.vae_scale_factor
        self.channels = pipe.transformer.config.in_channels // 4
        self.img_ids = pipe._prepare_latent_image_ids(1, self.h // 2, self.w // 2, "cpu", torch.float32)
        self.texts = {which: pipe.encode_prompt(prompt=p, prompt_2=p, device="cpu", max_sequence_length=SEQ)
                      for which, p in prompts.items()}

    def pack(self, latent: torch.Tensor) -> torch.Tensor:  # prepare's rearrange "b c (h 2) (w 2) -> b (h w) (c 2 2)"
        return self.pipe._pack_latents(latent, latent.shape[0], self.channels, self.h, self.w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        size = self.h * self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(tokens, size, size, self.pipe.vae_scale_factor)

    def __call__(self, img: torch.Tensor, t: float, which: str) -> torch.Tensor:
        txt, vec, txt_ids = self.texts[which]
        return self.pipe.transformer(
            hidden_states=img.float(), timestep=torch.full([1], t), guidance=torch.full([1], self.guidance[which]),
            pooled_projections=vec, encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=self.img_ids,
            return_dict=False)[0].double()


class SD3Network:
    """The tiny SD3 transformer as StableDiffusion3Pipeline calls it: timestep 1000 s, and with a scale w > 1 one
    call on the batch [negative "", positive] combined as v_u + w (v_c - v_u); float64 outside."""

    def __init__(self, pipe, prompts: dict, guidance_values: dict):
        self.pipe, self.guidance = pipe, guidance_values
        self.texts = {which: pipe.encode_prompt(prompt=p, prompt_2=None, prompt_3=None, device="cpu",
                                                do_classifier_free_guidance=guidance_values[which] > 1)
                      for which, p in prompts.items()}

    def pack(self, latent):
        return latent

    unpack = pack

    def __call__(self, img: torch.Tensor, t: float, which: str) -> torch.Tensor:
        pos, neg, pooled, neg_pooled = self.texts[which]
        w, hidden, timestep = self.guidance[which], img.float(), torch.full([1], t * 1000)
        if w <= 1:
            return self.pipe.transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=pos,
                                         pooled_projections=pooled, return_dict=False)[0].double()
        out = self.pipe.transformer(hidden_states=torch.cat([hidden, hidden]), timestep=timestep.expand(2),
                                    encoder_hidden_states=torch.cat([neg, pos]),
                                    pooled_projections=torch.cat([neg_pooled, pooled]), return_dict=False)[0]
        noise_pred_uncond, noise_pred_text = out.double().chunk(2)
        return noise_pred_uncond + w * (noise_pred_text - noise_pred_uncond)


@torch.no_grad()
def official_edit(network, z0: torch.Tensor, timesteps: list, kind: str):
    """edit.py: (edited latent, inverted noise), unpacked, float64."""
    z = denoise(lambda img, t: network(img, t, "source"), network.pack(z0.double()), timesteps, True, kind)
    x = denoise(lambda img, t: network(img, t, "edit"), z, timesteps, False, kind)
    return network.unpack(x), network.unpack(z)


def _flux_case(flux, num_steps: int):
    """(network, flowsteer's conditions, source image, source latent, the official schedule) on 64x64 FLUX."""
    size = 64
    network = FluxNetwork(flux.pipeline, size, {"source": SOURCE, "edit": EDIT},
                          {"source": 1.0, "edit": FLUX_GUIDANCE})
    conds = {"source_prompt": flux.condition(SOURCE, guidance_scale=1.0, max_sequence_length=SEQ),
             "edit_prompt": flux.condition(EDIT, guidance_scale=FLUX_GUIDANCE, max_sequence_length=SEQ)}
    image = _image(size)
    with torch.no_grad():
        z0 = flux.encode(image)
    tokens = network.pack(z0).shape[1]
    timesteps = get_schedule(num_steps, tokens)
    torch.testing.assert_close(torch.tensor(timesteps), flux.sigmas(num_steps, size, size), rtol=0, atol=1e-6)
    return network, conds, image, z0, timesteps


def _sd3_case(sd3, num_steps: int):
    """The same on 32x32 SD3, the prompts as text (flowsteer encodes them) and the pipeline scheduler's schedule."""
    network = SD3Network(sd3.pipeline, {"source": SOURCE, "edit": EDIT}, {"source": 1.0, "edit": SD3_GUIDANCE})
    conds = {"source_prompt": SOURCE, "edit_prompt": EDIT, "guidance_scale": SD3_GUIDANCE}
    image = _image(32)
    with torch.no_grad():
        z0 = sd3.encode(image)
    scheduler = type(sd3.pipeline.scheduler).from_config(sd3.pipeline.scheduler.config)
    scheduler.set_timesteps(num_steps)
    return network, conds, image, z0, scheduler.sigmas.tolist()


CASES = {"flux": _flux_case, "sd3": _sd3_case}


@pytest.mark.parametrize("kind", ["rf_solver", "fireflow"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_rf_solver_edit_matches_the_official_loops(request, family, kind):
    model = request.getfixturevalue(family)
    n = 4
    network, conds, image, z0, timesteps = CASES[family](model, n)
    reference, reference_noise = official_edit(network, z0, timesteps, kind)
    out = rf_solver_edit(model, source_image=image, num_steps=n, solver=kind, progress=False, **conds)
    torch.testing.assert_close(out.info["source_latent"], z0, rtol=0, atol=0)
    noise_error = (out.info["inverted"].double() - reference_noise).abs().max().item()
    error = (out.x.double() - reference).abs().max().item()
    assert noise_error < TOLERANCE and error < TOLERANCE, (noise_error, error)
    assert out.nfe == (4 * n if kind == "rf_solver" else 2 * n + 2)
    assert out.info["start_step"] == 0 and out.info["solver"] == kind and out.image.shape == image.shape

    # mutations: inverting under the edit prompt, or with the edit's guidance; the other solver (Euler for
    # RF-Solver, RF-Solver for FireFlow)
    if family == "flux":
        wrong_prompt = {"source_prompt": model.condition(EDIT, guidance_scale=1.0, max_sequence_length=SEQ)}
        wrong_guidance = {"source_prompt": model.condition(SOURCE, guidance_scale=FLUX_GUIDANCE,
                                                           max_sequence_length=SEQ)}
    else:
        wrong_prompt, wrong_guidance = {"source_prompt": EDIT}, {"source_guidance_scale": SD3_GUIDANCE}
    mutated = [rf_solver_edit(model, source_image=image, num_steps=n, solver=kind, progress=False,
                              **{**conds, **change}) for change in (wrong_prompt, wrong_guidance)]
    other = "euler" if kind == "rf_solver" else "rf_solver"
    scale = {"source_guidance_scale": 1.0} if family == "sd3" else {}  # a condition carries its own guidance
    mutated.append(inversion_edit(model, source_image=image, num_steps=n, solver=other, strength=1.0,
                                  progress=False, **scale, **conds))
    for result in mutated:
        assert (result.x.double() - reference).abs().max() > 100 * TOLERANCE


# -- inversion_edit --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_model():
    return guidance.load_model("default")


def _half_mask(size: int, dim: int) -> torch.Tensor:
    """A binary pixel mask, 1 (edit) on the first half along ``dim`` (-2 rows, -1 columns): aligned to the latent
    cells of every spatial factor dividing size / 2."""
    mask = torch.zeros(size, size)
    mask.narrow(dim, 0, size // 2).fill_(1.0)
    return mask


@pytest.mark.parametrize("solver, strength", [("fireflow", 1.0), ("euler", 0.5), ("rf_solver", 0.7)])
def test_a_masked_text_edit_follows_the_inversion_outside_the_mask(sd3, solver, strength):
    """Outside the mask every regenerated state is the inverted trajectory at the same level, ending on z_0 exactly;
    inside, the edit prompt moves the state."""
    image, n = _image(32), 4
    states, levels, seen = [], [], []

    def keep_state(step, sigma, state):
        states.append(state["x"].clone())
        return state

    out = inversion_edit(sd3, source_image=image, source_prompt=SOURCE, edit_prompt=EDIT, guidance_scale=SD3_GUIDANCE,
                         mask=_half_mask(32, -1), num_steps=n, solver=solver, strength=strength, progress=False,
                         callback=lambda d: (seen.append(d["step"]), levels.append(float(d["sigma"]))),
                         on_step_end=keep_state)
    z0, M, start = out.info["source_latent"], out.info["edit_mask"], out.info["start_step"]
    keep = z0.shape[-1] // 2
    assert torch.equal(M[..., :keep], torch.ones_like(M[..., :keep])) and not M[..., keep:].any()
    assert torch.equal(out.x[..., keep:], z0[..., keep:])  # exactly: the inverted trajectory ends on z_0
    assert (out.x[..., :keep] - z0[..., :keep]).abs().max() > 1e-2

    inverted = guidance.invert(sd3, image, sd3.condition(SOURCE, guidance_scale=1.0), num_steps=n, solver=solver,
                               strength=strength, return_trajectory=True, progress=False)
    torch.testing.assert_close(inverted.noise, out.info["inverted"], rtol=0, atol=0)
    assert seen == list(range(start, n)) and levels == out.sigmas[start:n].tolist()
    for i, state in zip(range(start, n), states):  # after step i: the level s_{i+1}, trajectory index N - 1 - i
        torch.testing.assert_close(state[..., keep:], inverted.trajectory[n - 1 - i][..., keep:], rtol=0, atol=0)


@pytest.fixture(scope="module")
def tissue(default_model):
    """The default model's bundled classifier steering toward "tissue" (a random 32x32 image is far from it)."""
    return make_guide(classifier="default", label="tissue").objective


def test_an_objective_edit_lowers_the_loss_and_keeps_the_outside_of_a_mask(default_model, tissue):
    image = _image(32, seed=0)
    common = dict(source_image=image, num_steps=6, progress=False)
    guided = inversion_edit(default_model, tissue, **common)
    barely = inversion_edit(default_model, tissue, step_size=1e-6, **common)
    with torch.no_grad():
        loss, loss_barely = float(tissue(default_model, guided.x)), float(tissue(default_model, barely.x))
    assert loss < 0.8 * loss_barely, (loss, loss_barely)  # measured 4.8 against 7.6
    start = guided.info["start_step"]
    assert guided.info["loss"].shape == (6 - start, 1)
    assert guided.image.shape == image.shape and guided.info["edit_mask"] is None

    masked = inversion_edit(default_model, tissue, mask=_half_mask(32, -2), **common)
    z0, rows = masked.info["source_latent"], masked.info["source_latent"].shape[-2] // 2
    assert torch.equal(masked.x[..., rows:, :], z0[..., rows:, :])
    assert (masked.x[..., :rows, :] - z0[..., :rows, :]).abs().max() > 1e-2


def _latent_pull(target: torch.Tensor) -> CallableObjective:
    return CallableObjective(lambda z: (z - target).square().flatten(1).sum(1), space="latent")


@pytest.mark.parametrize("num_steps, strength", [(6, 1.0), (6, 0.5), (5, 0.7), (10, 0.7), (4, 0.1)])
@pytest.mark.parametrize("solver", ["euler", "rf_solver", "fireflow"])
def test_strength_sets_the_start_step_and_the_evaluations(default_model, solver, num_steps, strength):
    objective = _latent_pull(torch.zeros(1, *default_model.latent_shape(32, 32)))
    out = inversion_edit(default_model, objective, source_image=_image(32), num_steps=num_steps, solver=solver,
                         strength=strength, decode=False, progress=False)
    start = int(num_steps - num_steps * strength)  # diffusers' get_timesteps (10 x 0.7 = 7.000000000000001 -> 2)
    run = num_steps - start
    assert out.info["start_step"] == start == start_step(num_steps, strength)
    assert out.nfe == {"euler": 2 * run, "rf_solver": 4 * run, "fireflow": 2 * run + 2}[solver]
    assert out.info["loss"].shape[0] == run and out.image is None
    torch.testing.assert_close(out.sigmas, default_model.sigmas(num_steps, 32, 32))


REFUSALS = [
    (dict(objective=None), r"^inversion_edit with neither an objective nor an edit_prompt regenerates the source"),
    (dict(cond="text"), r"^inversion_edit takes its conditions from source_prompt and edit_prompt; leave cond=None$"),
    (dict(latents=torch.zeros(1, 16, 4, 4)), r"^inversion_edit starts from the inversion of source_image; leave "
                                             r"latents=None"),
    (dict(generator=_gen()), r"^inversion_edit is deterministic .*: leave generator=None$"),
    (dict(step_size=0.0), r"^inversion_edit: step_size=0 ignores the objective; give a positive step_size"),
    (dict(step_size=-1.0), r"^step_size must be a number >= 0, got -1"),
    (dict(objective="tissue"), r"^objective must be None or an Objective, got str$"),
    (dict(solver="heun"), r"^solver must be one of 'euler', 'rf_solver', 'fireflow', got 'heun'$"),
    (dict(num_steps=0), r"^num_steps must be an integer >= 1, got 0$"),
    (dict(strength=0), r"^strength must be a number in \(0, 1\] .* got 0$"),
    (dict(strength=1.5), r"^strength must be a number in \(0, 1\] .* got 1.5$"),
    (dict(strength=True), r"^strength must be a number in \(0, 1\] .* got True$"),
    (dict(strength="0.5"), r"^strength must be a number in \(0, 1\] .* got '0.5'$"),
    (dict(source_prompt=SOURCE), r"^inversion_edit: source_prompt describes the source for an edit_prompt; give "
                                 r"the edit_prompt too$"),
    (dict(guidance_scale=2.0), r"^inversion_edit: guidance scales act on the prompts; give source_prompt and "
                               r"edit_prompt or drop the guidance scales$"),
    (dict(height=64), r"^height x width = 64xNone differs from the source image's 32x32"),
    (dict(mask=torch.ones(16, 16)), r"^the mask is 16x16 but the source image is 32x32; resize the mask"),
    (dict(mask=torch.full((32, 32), 2.0)), r"^mask values must lie in \[0, 1\]"),
    (dict(batch_size=2), r"^batch_size=2 differs from the 1 image\(s\) that source_image, the prompts and the mask "
                         r"give; leave it unset$"),
    (dict(source_image=torch.zeros(2, 3, 32, 32), source_prompt=[SOURCE] * 3, edit_prompt=[EDIT] * 3),
     r"^source_image has batch 2 but 3 images are edited; give 1 or 3$"),
    (dict(source_image=torch.zeros(3, 3, 32, 32), source_prompt=[SOURCE] * 2, edit_prompt=[EDIT] * 2),
     r"^the prompts give 2 conditions but 3 images are edited; give 1 or 3$"),
    (dict(source_image=torch.zeros(3, 3, 32, 32), mask=torch.ones(2, 1, 32, 32)),
     r"^mask has batch 2 but 3 images are edited; give 1 or 3$"),
    (dict(source_prompt=[SOURCE] * 2, edit_prompt=[EDIT] * 3),
     r"^inversion_edit: source_prompt has 2, edit_prompt has 3 entries; give one of each per image \(or one for all\)$"),
]


@pytest.mark.parametrize("changes, message", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_inversion_edit_refusals_are_one_line(sd3, changes, message):
    arguments = {"objective": _latent_pull(torch.zeros(1, 16, 4, 4)), "source_image": _image(32), "num_steps": 2,
                 "progress": False, **changes}
    with pytest.raises(ValueError, match=message) as error:
        inversion_edit(sd3, arguments.pop("objective"), **arguments)
    assert "\n" not in str(error.value)


def test_rf_solver_edit_needs_an_edit_prompt(sd3):
    with pytest.raises(ValueError, match=r"^rf_solver_edit needs edit_prompt, .* use inversion_edit\)$"):
        rf_solver_edit(sd3, source_image=_image(32), source_prompt=SOURCE, num_steps=2, progress=False)


@pytest.mark.parametrize("name", ["inversion_edit", "rf_solver_edit"])
def test_one_source_prompt_with_several_edit_prompts_edits_once_per_edit_prompt(sd3, name):
    out = guidance.get_method(name)(sd3, source_image=_image(32), source_prompt=SOURCE, edit_prompt=[EDIT, "a fox"],
                                    num_steps=2, decode=False, progress=False)
    assert out.x.shape[0] == 2


EDITORS = {"flowedit": {"generator": _gen()}, "rf_inversion": {"generator": _gen()}, "rf_solver_edit": {},
           "inversion_edit": {}}


@pytest.mark.parametrize("name", EDITORS)
def test_prompts_on_the_default_model_are_refused_in_one_line(default_model, name):
    with pytest.raises(ValueError) as error:
        guidance.get_method(name)(default_model, source_image=_image(32), source_prompt=SOURCE, edit_prompt=EDIT,
                                  num_steps=2, progress=False, **EDITORS[name])
    assert "\n" not in str(error.value) and "default" in str(error.value)


@pytest.mark.parametrize("name", EDITORS)
def test_prompts_on_the_default_model_name_the_text_conditioned_families(default_model, name):
    with pytest.raises(ValueError, match=r"needs a text-conditioned model \(a pipeline family: SD3, FLUX.1"):
        guidance.get_method(name)(default_model, source_image=_image(32), source_prompt=SOURCE, edit_prompt=EDIT,
                                  num_steps=2, progress=False, **EDITORS[name])


def test_a_guidance_scale_for_a_condition_is_refused(sd3):
    """A condition carries its own guidance: a scale given beside it would be silently ignored."""
    cond = sd3.condition(EDIT, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"^inversion_edit: a guidance scale for edit_prompt has no effect on a "
                                         r"condition"):
        inversion_edit(sd3, source_image=_image(32), edit_prompt=cond, guidance_scale=3.0, num_steps=2,
                       progress=False)
    out = rf_solver_edit(sd3, source_image=_image(32), source_prompt=sd3.condition(SOURCE, guidance_scale=1.0),
                         edit_prompt=cond, num_steps=2, decode=False, progress=False)  # no scale: none refused
    assert out.nfe == 8
