"""FlowDPS at the published settings against a transcription of the official loop, its options, refusals and
presets.

The official code is FlowDPS-Inverse/FlowDPS at commit 83618433cece8cbcd056344cf11c021c37f5e186 (Kim et al.,
"FlowDPS: Flow-Driven Posterior Sampling for Inverse Problems", ICCV 2025): the loop is ``SD3FlowDPS.sample`` and
``SD3FlowDPS.data_consistency`` in sd3_sampler.py, the settings solve.py's command line, the operators
functions/degradation.py with functions/svd_operators.py and functions/measurements.py. Its time is ours (the
scheduler's sigma). The transcription below runs in float64 on the exact velocity of an analytic colour prior,
with the operator, its adjoint and its pseudo-inverse as dense matrices; flowsteer keeps its state in float32.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from guidance import AnalyticGMMFlow, CallableObjective, MeasurementFidelity, get_method
from guidance.features.presets import get_preset, list_presets
from guidance.methods.flowdps import PRESETS, flowdps, resolve_back_projection, shifted_sigmas
from operators import make_operator
from tasks.studies.analytic_benchmark import smooth_image_prior
from official_problems import gen as _gen

FLOW = smooth_image_prior(shape=(3, 4, 4), components=3)
BATCH = 2
NOISE_STD = 0.03  # solve.py: y + 0.03 randn
TOLERANCE = 2e-5  # float32 state against the float64 transcription at step size 15 (measured: at most 6e-6)
COMMIT = "83618433cece8cbcd056344cf11c021c37f5e186"

# each official task on 4x4 images (flowsteer's operator, the back-projection the official code applies);
# motion blur: the official At is the identity, so its data term is the plain residual
PROBLEMS = {
    "sr_avgpool": ("sr_avgpool:factor=2", "pseudo_inverse"),
    "sr_bicubic": ("sr:factor=2,padding=symmetric", "pseudo_inverse"),
    "deblur_gauss": ("gaussian_blur:kernel_size=3,sigma=1.0,padding=constant", "adjoint"),
    "deblur_motion": ("motion_blur:kernel_size=3", "none"),
    "inpainting": ("inpaint_box:size=2", "adjoint"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class UpsampledFlow(AnalyticGMMFlow):
    """A latent model with a known linear codec: the analytic flow lives on (C, h, w) latents, the decoder is
    nearest-neighbour upsampling by 2 and the encoder its pseudo-inverse, 2x2 average pooling."""

    spatial_factor = 2
    size_multiple = 2

    def _setup(self, device):
        super()._setup(device)
        self.default_size = (2 * self.shape[1], 2 * self.shape[2])

    def latent_shape(self, height, width):
        if (height, width) != self.default_size:
            raise ValueError(f"UpsampledFlow makes {self.default_size} images only, got {(height, width)}")
        return self.shape

    def decode(self, latent):
        return latent.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    def encode(self, image, generator=None):
        return torch.nn.functional.avg_pool2d(image, 2)


LATENT_FLOW = UpsampledFlow.from_mixture(smooth_image_prior(shape=(3, 2, 2), components=3).prior)


def dense(flow, op, back_projection, image_shape):
    """(A, B, D) as float64 functions on flat vectors: the operator, the back-projection (Aᵀ, A⁺ or I) and the
    decoder (the identity, or the upsampling of UpsampledFlow), from dense matrices."""
    d = math.prod(image_shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *image_shape)
    matrix = op.to(torch.float64)(basis).reshape(d, -1).T  # (m, d)
    back = {"adjoint": matrix.T, "pseudo_inverse": torch.linalg.pinv(matrix),
            "none": torch.eye(matrix.shape[0], dtype=torch.float64)}[back_projection]
    op.to(torch.float32)
    latent = math.prod(flow.shape)
    decoder = flow.decode(torch.eye(latent, dtype=torch.float64).reshape(latent, *flow.shape)).reshape(latent, -1).T
    return (lambda x: x @ matrix.T), (lambda r: r @ back.T), (lambda z: z.reshape(len(z), -1) @ decoder.T)


def official_flowdps(velocity, A, B, D, y, z, sigmas, step_size, randn, joint=True, squared=False,
                     swap_mix=False, fresh_noise_only=False):
    """``SD3FlowDPS.sample`` with ``data_consistency`` transcribed (float64, flat measurements): ``sigmas`` are
    the N scheduler sigmas (sigma_next = 0 after the last); the norm is joint over the batch (``.view(1, -1)``)
    or, with ``joint=False``, one per sample (flowsteer's). ``squared``, ``swap_mix`` and ``fresh_noise_only``
    break it in plausible ways (for the mutation check)."""
    def data_consistency(z0t):
        z0t = z0t.detach().requires_grad_(True)
        for _ in range(3):
            x0t = D(z0t)
            difference = B(y) - B(A(x0t))
            norms = torch.linalg.norm(difference.reshape(1 if joint else len(difference), -1), dim=1)
            loss = (norms.square() if squared else norms).sum()
            grad = torch.autograd.grad(loss, z0t)[0]
            z0t = z0t - step_size * grad
        return z0t.detach()

    steps = len(sigmas)
    for i, sigma in enumerate(sigmas):
        sigma_next = sigmas[i + 1] if i + 1 < steps else 0.0
        v = velocity(z, sigma)
        z0t = z - sigma * v
        z1t = z + (1 - sigma) * v
        delta = sigma - sigma_next
        z0y = data_consistency(z0t)
        z0y = sigma * z0t + (1 - sigma) * z0y if swap_mix else (1 - sigma) * z0t + sigma * z0y
        fresh = randn(z1t.shape)
        noise = fresh if fresh_noise_only else math.sqrt(sigma_next) * z1t + math.sqrt(1 - sigma_next) * fresh
        z = z0y + (sigma - delta) * (noise - z0y)
    return z


def _problem(task, flow=FLOW, seed=1):
    spec, back_projection = PROBLEMS[task]
    op = make_operator(spec)
    image_shape = (3, flow.default_size[0], flow.default_size[1])
    x_true = flow.decode(flow.sample_prior(BATCH, _gen(seed), dtype=torch.float64))
    clean = op.to(torch.float64)(x_true)
    op.to(torch.float32)
    y = clean + NOISE_STD * torch.randn(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    return op, y, back_projection, image_shape


def _grid(num_steps, shift):
    """The official sigmas of the analytic flow (its unshifted linspace(1, 0, N + 1), re-shifted as
    set_timesteps does), without the final 0."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[:num_steps]
    return (shift * t / (1 + (shift - 1) * t)).tolist()


def _official(task, op, y, back_projection, image_shape, flow=FLOW, seed=7, num_steps=28, step_size=15.0,
              shift=4.0, **changes):
    noise = _gen(seed)
    randn = lambda shape: torch.randn(shape, generator=noise).double()  # noqa: E731  (flowsteer's float32 stream)
    A, B, D = dense(flow, op, back_projection, image_shape)
    # the starting noise is drawn in the model's dtype (float64 for analytic flows) and kept in float32
    z = torch.randn((BATCH, *flow.shape), generator=noise, dtype=torch.float64).float().double()
    velocity = lambda z, s: flow.velocity(z, s)  # noqa: E731
    out = official_flowdps(velocity, A, B, D, y.reshape(len(y), -1), z, _grid(num_steps, shift), step_size, randn,
                           **changes)
    return out


def _flowsteer(task, op, y, back_projection, flow=FLOW, seed=7, **overrides):
    preset = get_preset(f"flowdps_{task}")
    options = {**preset["options"], "back_projection": back_projection, **overrides}
    objective = MeasurementFidelity(op, y.float(), **preset["objective"])
    return flowdps(flow, objective, num_steps=preset["num_steps"], generator=_gen(seed), progress=False, **options)


# -- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(PROBLEMS))
def test_the_published_settings_reproduce_the_official_loop(task):
    op, y, back_projection, image_shape = _problem(task)
    out = _flowsteer(task, op, y, back_projection, official_quirks=True)
    assert out.nfe == 28 and out.x.shape == (BATCH, 3, 4, 4) and out.info["back_projection"] == back_projection
    error = float((out.x.double() - _official(task, op, y, back_projection, image_shape)).abs().max())
    assert error < TOLERANCE, f"{task}: max |flowsteer - official| = {error:.2e}"


@pytest.mark.parametrize("task", ["sr_avgpool", "inpainting"])
def test_per_sample_norms_reproduce_the_loop_with_one_norm_per_sample(task):
    """flowsteer's default takes one norm per sample: the official loop with ``.view(B, -1)`` norms, which is the
    official computation for each image of a batch run one at a time."""
    op, y, back_projection, image_shape = _problem(task)
    out = _flowsteer(task, op, y, back_projection)
    reference = _official(task, op, y, back_projection, image_shape, joint=False)
    assert float((out.x.double() - reference).abs().max()) < TOLERANCE


@pytest.mark.parametrize("task", ["sr_avgpool", "inpainting"])
def test_through_a_linear_decoder_the_gradient_reaches_the_latent(task):
    """On a latent model with a known codec (nearest upsampling), the data step differentiates through D."""
    op, y, back_projection, image_shape = _problem(task, LATENT_FLOW)
    out = _flowsteer(task, op, y, back_projection, LATENT_FLOW, official_quirks=True)
    assert out.x.shape == (BATCH, 3, 2, 2) and out.image.shape == (BATCH, 3, 4, 4)
    reference = _official(task, op, y, back_projection, image_shape, LATENT_FLOW)
    assert float((out.x.double() - reference).abs().max()) < TOLERANCE


def test_the_comparison_catches_a_squared_norm_a_swapped_mix_plain_renoising_and_the_joint_norm():
    """The official step descends the norm, not its square; mixes (1 − s) x0_hat + s x0_y, not the reverse;
    re-noises with sqrt(s') eps_hat + sqrt(1 − s') ε, not fresh noise alone; and couples the batch through one
    norm, which flowsteer's default does not; A⁺ and Aᵀ differ by the factor² for SR. Each shows at many times
    the tolerance."""
    task = "sr_avgpool"
    op, y, back_projection, image_shape = _problem(task)
    out = _flowsteer(task, op, y, back_projection, official_quirks=True).x.double()
    assert float((out - _official(task, op, y, back_projection, image_shape)).abs().max()) < TOLERANCE
    wrong = [_official(task, op, y, back_projection, image_shape, **{flag: True})
             for flag in ("squared", "swap_mix", "fresh_noise_only")]
    wrong.append(_official(task, op, y, "adjoint", image_shape))
    wrong.append(_flowsteer(task, op, y, back_projection).x.double())  # per-sample norms against the joint one
    for other in wrong:
        assert float((other - out).abs().max()) > 100 * TOLERANCE


# -- the schedule and the back-projection ---------------------------------------------------------------------

class _Scheduled:
    def __init__(self, scheduler):
        self.scheduler = scheduler


def test_shift_reshifts_the_scheduler_as_diffusers_0_30_did():
    """diffusers 0.30.1 (the pinned version) reads ``config.shift`` in ``set_timesteps``: the official
    ``scheduler.config.shift = 4.0`` spaces N timesteps between the shift-3 scheduler's sigma_max and sigma_min,
    divides by 1000 and shifts them with 4.0; later versions ignore the assignment."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigma_max, sigma_min = 1.0, 3 * 0.001 / (1 + 2 * 0.001)
    t = np.linspace(sigma_max * 1000, sigma_min * 1000, 28) / 1000
    official = np.append(4.0 * t / (1 + 3.0 * t), 0.0)
    got = shifted_sigmas(_Scheduled(scheduler), 28, 768, 768, 4.0)
    np.testing.assert_allclose(got.numpy(), official, rtol=1e-6, atol=1e-7)
    assert scheduler.shift == 3.0  # the model's scheduler is left as it was
    with pytest.raises(ValueError, match="has none"):
        shifted_sigmas(_Scheduled(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)), 4, 64, 64, 4.0)
    with pytest.raises(ValueError, match="has neither"):
        shifted_sigmas(object(), 4, 64, 64, 4.0)
    torch.testing.assert_close(shifted_sigmas(FLOW, 4, 4, 4, 1.0), FLOW.sigmas(4))


def test_auto_back_projection_is_the_pseudo_inverse_where_the_measurement_is_smaller():
    """A⁺ for super-resolution (the official "sr" tasks) and other operators that shrink the image and have one
    (colorization); Aᵀ for same-size linear operators; the objective's own residual otherwise."""
    image = (3, 8, 8)

    def resolved(spec, objective=None):
        op = make_operator(spec)
        objective = objective or MeasurementFidelity(op, op(torch.zeros(1, *image)))
        return resolve_back_projection(objective, "auto", image, "flowdps")

    assert resolved("sr_avgpool:factor=2") == resolved("sr:factor=2") == resolved("colorize") == "pseudo_inverse"
    assert resolved("gaussian_blur:kernel_size=3") == resolved("inpaint_box") == "adjoint"
    op = make_operator("sr_avgpool:factor=2")
    latent = MeasurementFidelity(op, op(torch.zeros(1, *image)), space="latent")
    assert resolved("jpeg") == resolved("denoise", latent) == "none"
    assert resolved("denoise", CallableObjective(lambda x: x.square().flatten(1).sum(1))) == "none"


# -- behaviour on the analytic prior ---------------------------------------------------------------------------

def test_the_default_reduces_the_residual_against_unguided_sampling():
    flow = smooth_image_prior()  # the benchmark's 1x8x8 prior
    op = make_operator("inpaint_box:fraction=0.25")
    y = op.measure(flow.sample_prior(4, _gen(0)), _gen(1))
    objective = MeasurementFidelity(op, y)
    guided = flowdps(flow, objective, num_steps=20, generator=_gen(2), progress=False)
    unguided = get_method("unguided")(flow, objective, num_steps=20, generator=_gen(2), progress=False)
    assert float(objective.loss(guided.x).sum()) < 0.1 * float(objective.loss(unguided.x).sum())
    assert torch.isfinite(guided.info["residual"]).all() and guided.info["residual"].shape == (4,)


def test_a_general_objective_is_descended_through_its_own_loss():
    target = FLOW.sample_prior(1, _gen(3))
    objective = CallableObjective(lambda x: (x - target).square().flatten(1).sum(1))
    common = dict(num_steps=10, generator=_gen(4), progress=False, batch_size=2)
    guided = flowdps(FLOW, objective, step_size=0.2, **common)
    assert guided.info["back_projection"] == "none"
    assert float(objective.loss(guided.x).max()) < float(objective.loss(flowdps(FLOW, objective, step_size=0.0,
                                                                                **common).x).min())
    negative = CallableObjective(lambda x: -x.square().flatten(1).sum(1))
    flowdps(FLOW, negative, step_size=0.01, **common)  # its loss is descended as it is
    with pytest.raises(ValueError, match="negative loss; pass use_norm=False"):
        flowdps(FLOW, negative, use_norm=True, **common)


def test_an_exact_fit_has_a_finite_gradient():
    """At y = A(x0_hat) exactly the norm's gradient is finite: the step leaves a perfect fit where it is."""
    op = make_operator("denoise")
    x = FLOW.sample_prior(1, _gen(5))
    out = flowdps(FLOW, MeasurementFidelity(op, x), num_steps=1, latents=x, progress=False, generator=_gen(6))
    assert torch.isfinite(out.x).all()


@pytest.mark.parametrize("options, message", [
    ({"back_projection": "transpose"}, "back_projection must be one of"),
    ({"back_projection": "pseudo_inverse"}, "has none; use back_projection='adjoint'"),
    ({"data_steps": 0}, "data_steps=0 takes no data step"),
    ({"step_size": -1.0}, "step_size must be a number >= 0"),
    ({"shift": 0.0}, "shift must be a number > 0"),
    ({"official_quirks": True, "use_norm": False}, "drop one of them"),
    ({"use_norm": "yes"}, "use_norm must be True or False"),
])
def test_bad_options_are_refused(options, message):
    op = make_operator("gaussian_blur:kernel_size=3,sigma=1.0")
    objective = MeasurementFidelity(op, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=message):
        flowdps(FLOW, objective, num_steps=2, progress=False, **options)


def test_a_back_projection_needs_a_linear_pixel_space_fidelity():
    op = make_operator("sr_avgpool:factor=2")
    latent = MeasurementFidelity(op, torch.zeros(1, 3, 2, 2), space="latent")
    with pytest.raises(ValueError, match="needs a pixel-space MeasurementFidelity with a linear operator"):
        flowdps(LATENT_FLOW, latent, num_steps=2, progress=False, back_projection="adjoint")
    with pytest.raises(ValueError, match="needs an Objective"):
        flowdps(FLOW, None, num_steps=2, progress=False)


def test_on_a_tiny_sd3_model_it_runs_and_reduces_the_residual(sd3):
    """SD3's scheduler re-shifted to 4.0, the gradient through its VAE decoder, 2 steps at 32x32."""
    from tiny_models import NEGATIVE, PROMPT, measured_fidelity

    objective = measured_fidelity("sr_avgpool:factor=4", 32)
    cond = sd3.condition(PROMPT, NEGATIVE, 2.0)
    common = dict(cond=cond, num_steps=2, height=32, width=32, generator=_gen(0), progress=False)
    out = flowdps(sd3, objective, step_size=15.0, shift=4.0, **common)  # the published step and shift
    unguided = get_method("unguided")(sd3, objective, **common)
    assert out.nfe == 2 and torch.isfinite(out.image).all() and out.info["back_projection"] == "pseudo_inverse"
    torch.testing.assert_close(out.sigmas, shifted_sigmas(sd3, 2, 32, 32, 4.0))
    assert float(objective.loss(out.image)) < 0.8 * float(objective.loss(unguided.image))  # measured: 0.63


# -- the presets ---------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    assert set(PRESETS) == {f"flowdps_{task}" for task in PROBLEMS} and set(PRESETS) <= set(list_presets())
    prompts = {"sr_avgpool": "a photo of a closed face of a dog", "deblur_motion": "a photo of a closed face",
               "sr_bicubic": "a high quality photo of animal, bush, close-up, fox, grass, green, greenery, hide, "
                             "panda, red, red panda, stare"}
    for task, (_, back_projection) in PROBLEMS.items():
        preset = get_preset(f"flowdps_{task}")
        assert preset["method"] == "flowdps" and preset["num_steps"] == 28  # solve.py --NFE 28
        # solve.py's --step_size 15 (sample()'s own default is 30), num_iters = 3, scheduler.config.shift = 4.0
        assert preset["options"] == {"step_size": 15.0, "data_steps": 3, "back_projection": back_projection,
                                     "shift": 4.0}
        assert preset["guidance_scale"] == 2.0 and preset["resolution"] == 768 and preset["noise_std"] == 0.03
        assert preset["model"] == "stabilityai/stable-diffusion-3-medium-diffusers"
        assert preset["objective"] == {"space": "pixel", "weight": 1.0, "reduction": "sum"}
        assert preset.get("prompt") == prompts.get(task)
        assert COMMIT in preset["source"] and "ICCV 2025" in preset["source"] and task in preset["note"]
        assert get_preset(f"flowdps_{task}", official_quirks=True)["options"]["official_quirks"] is True
        for spec in preset["operators"]:
            make_operator(spec)


def test_the_sr_presets_operators_are_the_official_ones():
    """functions/degradation.py at x12: ``sr_avgpool`` is 12x12 block averaging; ``sr_bicubic`` is ``SRConv``
    with taps W((i − 2f + 1/2)/f), i = 0..4f−1 (Keys, a = −0.5), normalised, output i centred at input
    i·f + f//2 with reflective indices (−j − 1 below 0, 2n − 1 − j above n − 1), applied along rows and columns."""
    f, n = 12, 48
    x = torch.randn(1, 3, n, n, generator=_gen(8), dtype=torch.float64)

    def keys(u, a=-0.5):
        u = abs(u)
        return (a + 2) * u**3 - (a + 3) * u**2 + 1 if u <= 1 else (a * u**3 - 5 * a * u**2 + 8 * a * u - 4 * a
                                                                      if u < 2 else 0.0)

    taps = np.array([keys((i - np.floor(4 * f / 2) + 0.5) / f) for i in range(4 * f)])
    taps /= taps.sum()
    small = np.zeros((n // f, n))
    for i in range(f // 2, n + f // 2, f):
        for j in range(i - 2 * f, i + 2 * f):
            k = -j - 1 if j < 0 else (2 * n - 1 - j if j >= n else j)
            small[i // f, k] += taps[j - i + 2 * f]
    small = torch.from_numpy(small)
    bicubic = make_operator(PRESETS["flowdps_sr_bicubic"]["operators"][0]).to(torch.float64)
    torch.testing.assert_close(bicubic(x), small @ x @ small.T, rtol=0, atol=1e-6)  # float32 taps
    avgpool = make_operator(PRESETS["flowdps_sr_avgpool"]["operators"][0]).to(torch.float64)
    blocks = x.reshape(1, 3, n // f, f, n // f, f).mean((3, 5))
    torch.testing.assert_close(avgpool(x), blocks, rtol=0, atol=1e-12)
