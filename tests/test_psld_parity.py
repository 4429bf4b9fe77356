"""The PSLD flow port at the published settings against a transcription of the official loop, its options,
refusals and presets.

The official code is ``SD3PSLD.sample`` in sd3_sampler.py of FlowDPS-Inverse/FlowDPS at commit
83618433cece8cbcd056344cf11c021c37f5e186 (the PSLD baseline of Kim et al., "FlowDPS: Flow-Driven Posterior
Sampling for Inverse Problems", ICCV 2025; PSLD: Rout et al., NeurIPS 2023), run by solve.py. Its time is ours.
The transcription runs in float64 on the exact, differentiable velocity of an analytic colour prior, one image at
a time as the official code does, with the operator, its adjoint / pseudo-inverse and the codec as dense matrices;
flowsteer keeps its state in float32. On the pixel prior the codec is the identity and the gluing term is the
back-projected residual; on ``UpsampledFlow`` (nearest upsampling, average-pooling encoder) it runs through both.
"""

import math

import pytest
import torch
from test_flowdps_parity import LATENT_FLOW, PROBLEMS, dense

from guidance import CallableObjective, DivergenceError, MeasurementFidelity, get_method
from guidance.features.presets import get_preset, list_presets
from guidance.methods.flowdps import shifted_sigmas
from guidance.methods.psld import PRESETS, psld
from operators import make_operator
from tasks.studies.analytic_benchmark import smooth_image_prior
from official_problems import gen as _gen

FLOW = smooth_image_prior(shape=(3, 4, 4), components=3)
BATCH = 2
NOISE_STD = 0.03  # solve.py: y + 0.03 randn
STEP_SIZE = 0.3  # the published 15 is scaled to these 48-value states (see test_the_published_settings_...)
TOLERANCE = 2e-6  # float32 state against the float64 transcription (measured: at most 2e-7)
COMMIT = "83618433cece8cbcd056344cf11c021c37f5e186"


pytestmark = pytest.mark.usefixtures("one_thread")


def official_psld(velocity, A, B, D, E, y, z, sigmas, step_size, weights=(1.0, 0.1), squared=False,
                  detach_encoder=False, skip_network=False):
    """``SD3PSLD.sample`` transcribed for one image (float64, flat measurements): ``sigmas`` are the N scheduler
    sigmas (sigma_next = 0 after the last). ``squared``, ``detach_encoder`` and ``skip_network`` (the gradient
    taken at z0t, as if the network's Jacobian were the identity) break it in plausible ways."""
    def norm(t):
        n = torch.linalg.norm(t.reshape(1, -1))
        return n.square() if squared else n

    steps = len(sigmas)
    for i, sigma in enumerate(sigmas):
        sigma_next = sigmas[i + 1] if i + 1 < steps else 0.0
        z = z.detach().requires_grad_(True)
        pred_v = velocity(z, sigma)
        z0t = z - sigma * pred_v
        z1t = z + (1 - sigma) * pred_v
        delta = sigma - sigma_next
        if skip_network:
            z0t = z0t.detach().requires_grad_(True)
        x_pred = D(z0t)
        y_pred = A(x_pred)
        y_residue = norm(y_pred - y)
        ortho_proj = x_pred - B(y_pred)
        parallel_proj = B(y)
        recon_z = E(parallel_proj + ortho_proj)
        if detach_encoder:
            recon_z = recon_z.detach()
        z0_residue = norm(z0t - recon_z)
        residue = weights[0] * y_residue + weights[1] * z0_residue
        grad = torch.autograd.grad(residue, z0t if skip_network else z)[0]
        z = z0t + (sigma - delta) * (z1t - z0t) - step_size * grad
    return z.detach()


def _problem(task, flow=FLOW, seed=1):
    spec, back_projection = PROBLEMS[task]
    op = make_operator(spec)
    x_true = flow.decode(flow.sample_prior(BATCH, _gen(seed), dtype=torch.float64))
    clean = op.to(torch.float64)(x_true)
    op.to(torch.float32)
    y = clean + NOISE_STD * torch.randn(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    start = torch.randn((BATCH, *flow.shape), generator=_gen(seed + 2)).double()
    return op, y, back_projection, start


def _official(op, y, back_projection, start, flow=FLOW, num_steps=28, step_size=STEP_SIZE, shift=4.0, **changes):
    image_shape = (3, *flow.default_size)
    A, B, D = dense(flow, op, back_projection, image_shape)
    d = math.prod(image_shape)
    encoder = flow.encode(torch.eye(d, dtype=torch.float64).reshape(d, *image_shape)).reshape(d, -1).T
    E = lambda x: (x @ encoder.T).reshape(len(x), *flow.shape)  # noqa: E731
    velocity = lambda z, s: flow.velocity(z, s, grad=True)  # noqa: E731
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[:num_steps]  # the analytic flow's own grid
    sigmas = (shift * t / (1 + (shift - 1) * t)).tolist()
    flat = y.reshape(len(y), -1)
    return torch.cat([official_psld(velocity, A, B, D, E, flat[b:b + 1], start[b:b + 1], sigmas, step_size,
                                    **changes) for b in range(len(y))])  # one image at a time, as solve.py


def _flowsteer(task, op, y, back_projection, start, flow=FLOW, **overrides):
    preset = get_preset(f"psld_{task}")
    options = {**preset["options"], "step_size": STEP_SIZE, "back_projection": back_projection, **overrides}
    objective = MeasurementFidelity(op, y.float(), **preset["objective"])
    return psld(flow, objective, num_steps=preset["num_steps"], latents=start.float(), progress=False, **options)


# -- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(PROBLEMS))
def test_the_published_settings_reproduce_the_official_loop(task):
    """The preset's settings but the step size: 15 suits SD3 latents at 768², and on 48 values it throws the
    state far off at once (the analytic benchmark's best is about 0.3; the loop is the same for any step)."""
    op, y, back_projection, start = _problem(task)
    out = _flowsteer(task, op, y, back_projection, start)
    assert out.nfe == out.info["network_backward_passes"] == 28
    assert out.info["back_projection"] == back_projection
    error = float((out.x.double() - _official(op, y, back_projection, start)).abs().max())
    assert error < TOLERANCE, f"{task}: max |flowsteer - official| = {error:.2e}"


@pytest.mark.parametrize("task", ["sr_bicubic", "inpainting"])
def test_through_a_linear_codec_the_gluing_term_runs_through_encoder_and_decoder(task):
    op, y, back_projection, start = _problem(task, LATENT_FLOW)
    out = _flowsteer(task, op, y, back_projection, start, LATENT_FLOW)
    assert out.x.shape == (BATCH, 3, 2, 2) and out.image.shape == (BATCH, 3, 4, 4)
    reference = _official(op, y, back_projection, start, LATENT_FLOW)
    assert float((out.x.double() - reference).abs().max()) < TOLERANCE


def test_the_comparison_catches_squared_norms_swapped_weights_a_detached_encoder_and_skipping_the_network():
    """The official terms are norms, weighted 1.0 (measurement) and 0.1 (gluing); the gluing gradient runs
    through the encoder; the gradient is taken at the state, through the network's Jacobian. Each mistake shows
    at many times the tolerance. (Inpainting: with SR by block means on this codec E A⁺ A D = I, and the gluing
    term equals the measurement term.)"""
    op, y, back_projection, start = _problem("inpainting", LATENT_FLOW)
    out = _flowsteer("inpainting", op, y, back_projection, start, LATENT_FLOW).x.double()
    assert float((out - _official(op, y, back_projection, start, LATENT_FLOW)).abs().max()) < TOLERANCE
    for change in ({"squared": True}, {"weights": (0.1, 1.0)}, {"detach_encoder": True}, {"skip_network": True}):
        wrong = _official(op, y, back_projection, start, LATENT_FLOW, **change)
        assert float((wrong - out).abs().max()) > 100 * TOLERANCE, change


def test_on_a_pixel_model_the_gluing_term_is_the_back_projected_residual():
    """E = D = I: x0_hat − (x0_hat − B(A x0_hat − y)) = B(A x0_hat − y), not zero."""
    op, y, _, start = _problem("sr_avgpool")
    seen = []
    out = psld(FLOW, MeasurementFidelity(op, y.float()), num_steps=3, latents=start.float(), progress=False,
               callback=lambda info: seen.append(info["x0_hat"]))
    expected = op.pseudo_inverse(op(seen[-1]) - y.float()).flatten(1).norm(dim=1)
    torch.testing.assert_close(out.info["gluing_residual"], expected)
    assert bool((expected > 0.01).all())


# -- behaviour -----------------------------------------------------------------------------------------------

def test_the_default_reduces_the_residual_against_unguided_sampling():
    flow = smooth_image_prior()  # the benchmark's 1x8x8 prior
    op = make_operator("sr:factor=2")
    y = op.measure(flow.sample_prior(4, _gen(0)), _gen(1))
    objective = MeasurementFidelity(op, y)
    guided = psld(flow, objective, num_steps=20, generator=_gen(2), progress=False)
    unguided = get_method("unguided")(flow, objective, num_steps=20, generator=_gen(2), progress=False)
    assert float(objective.loss(guided.x).sum()) < 0.1 * float(objective.loss(unguided.x).sum())


def test_an_absurd_step_size_diverges_with_an_error_naming_the_step():
    op = make_operator("inpaint_box:size=2")
    with pytest.raises(DivergenceError, match=r"psld diverged.*at step \d+; use a smaller step_size than 1000000"):
        psld(FLOW, MeasurementFidelity(op, torch.zeros(1, 3, 4, 4)), num_steps=4, step_size=1e6, progress=False,
             generator=_gen(0))


@pytest.mark.parametrize("options, message", [
    ({"measurement_weight": 0.0, "gluing_weight": 0.0}, "both 0"),
    ({"gluing_weight": -1.0}, "gluing_weight must be a number >= 0"),
    ({"back_projection": "none"}, "not the image's"),
    ({"back_projection": "both"}, "back_projection must be one of"),
    ({"posterior_sample": True}, "pixel model without one"),
    ({"shift": -4.0}, "shift must be a number > 0"),
])
def test_bad_options_are_refused(options, message):
    op = make_operator("sr_avgpool:factor=2")
    with pytest.raises(ValueError, match=message):
        psld(FLOW, MeasurementFidelity(op, torch.zeros(1, 3, 2, 2)), num_steps=2, progress=False, **options)


def test_objectives_without_a_pixel_space_operator_are_refused():
    op = make_operator("sr_avgpool:factor=2")
    latent = MeasurementFidelity(op, torch.zeros(1, 3, 1, 1), space="latent")
    for objective in (latent, CallableObjective(lambda x: x.square().flatten(1).sum(1))):
        with pytest.raises(ValueError, match="psld needs a pixel-space MeasurementFidelity"):
            psld(LATENT_FLOW, objective, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="posterior_sample=True draws"):
        psld(LATENT_FLOW, MeasurementFidelity(op, torch.zeros(1, 3, 2, 2)), num_steps=2, progress=False,
             posterior_sample=True)
    with pytest.raises(ValueError, match="gluing_weight=0"):
        psld(LATENT_FLOW, MeasurementFidelity(op, torch.zeros(1, 3, 2, 2)), num_steps=2, progress=False,
             posterior_sample=True, gluing_weight=0.0, generator=_gen(0))


def test_on_a_tiny_sd3_model_it_runs_and_reduces_the_residual(sd3):
    """Through SD3's transformer (checkpointed, restored after), VAE decoder and encoder; 2 steps at 32x32,
    SD3's scheduler re-shifted to 4.0; the encoder's posterior sampled from the generator on request."""
    from tiny_models import NEGATIVE, PROMPT, measured_fidelity

    objective = measured_fidelity("sr_avgpool:factor=4", 32)
    common = dict(cond=sd3.condition(PROMPT, NEGATIVE, 2.0), num_steps=2, height=32, width=32, progress=False)
    out = psld(sd3, objective, step_size=3.0, shift=4.0, generator=_gen(0), **common)
    unguided = get_method("unguided")(sd3, objective, generator=_gen(0), **common)
    assert out.nfe == 2 and torch.isfinite(out.image).all() and not sd3.transformer.is_gradient_checkpointing
    torch.testing.assert_close(out.sigmas, shifted_sigmas(sd3, 2, 32, 32, 4.0))
    assert float(objective.loss(out.image)) < 0.95 * float(objective.loss(unguided.image))  # measured: 0.9
    sampled = psld(sd3, objective, step_size=3.0, shift=4.0, posterior_sample=True, generator=_gen(0), **common)
    assert torch.isfinite(sampled.x).all() and not torch.equal(sampled.x, out.x)


# -- the presets ---------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    assert set(PRESETS) == {f"psld_{task}" for task in PROBLEMS} and set(PRESETS) <= set(list_presets())
    for task, (_, back_projection) in PROBLEMS.items():
        preset, flowdps_preset = get_preset(f"psld_{task}"), get_preset(f"flowdps_{task}")
        assert preset["method"] == "psld" and preset["num_steps"] == 28  # solve.py --NFE 28
        # solve.py's --step_size 15 (sample()'s own default is 50); residue = 1.0 y_residue + 0.1 z0_residue
        assert preset["options"] == {"step_size": 15.0, "measurement_weight": 1.0, "gluing_weight": 0.1,
                                     "back_projection": back_projection, "shift": 4.0}
        for key in ("operators", "noise_std", "resolution", "model", "guidance_scale", "objective"):
            assert preset[key] == flowdps_preset[key], key
        assert preset.get("prompt") == flowdps_preset.get("prompt")
        assert COMMIT in preset["source"] and "SD3PSLD" in preset["source"] and "NeurIPS 2023" in preset["source"]
        assert task in preset["note"] and "posterior" in preset["note"]
        get_method("psld", **preset["options"])
