"""ICTM at the published settings against a transcription of the official loop, its presets and its refusals.

The official code is annegnx/PnP-Flow at commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c (run of Zhang et al.,
"Flow Priors for Linear Inverse Problems via Iterative Corrupted Trajectory Matching", NeurIPS 2024): the loop is
``FLOW_PRIORS.solve_ip`` in pnpflow/methods/flow_priors.py, the trace estimate ``hut_estimator`` in
pnpflow/utils.py, N 100, K 1 and start_time 0 in config/method_config/flow_priors.yaml, eta and lmbda per problem in
scripts/script_test.sh, the noise levels in main.py. The transcription runs in the official time (t = 0 noise,
t = 1 data, velocity towards the data), in float64, on the exact flow of an analytic colour prior with the operator
as a dense matrix, with its own Adam and ``torch.autograd.functional.jvp``; the Hutchinson probes are the signs of
the generator's normal draws, as flowsteer draws them.
"""

import functools

import pytest
import torch

from guidance import MeasurementFidelity
from guidance.methods import get_method
from guidance.methods.ictm import PRESETS, ictm, ictm_grid
from operators import make_operator
from tasks.studies.analytic_benchmark import smooth_image_prior
from official_problems import OPERATORS, gen as _gen

FLOW = smooth_image_prior(shape=(3, 4, 4), components=3)
BATCH = 2
TOLERANCE = 1e-5  # float32 state against the float64 transcription (measured: at most 1.8e-6)

# config/method_config/flow_priors.yaml (N, K, start_time), scripts/script_test.sh (the FLOW PRIORS block: eta,
# lmbda) and main.py (sigma_noise of each problem with noise_type 'gaussian')
OFFICIAL = {
    "denoising": {"N": 100, "K": 1, "start_time": 0.0, "eta": 0.01, "lmbda": 100.0, "sigma_noise": 0.2},
    "gaussian_deblurring_FFT": {"N": 100, "K": 1, "start_time": 0.0, "eta": 0.01, "lmbda": 1000.0,
                                "sigma_noise": 0.05},
    "superresolution": {"N": 100, "K": 1, "start_time": 0.0, "eta": 0.1, "lmbda": 10000.0, "sigma_noise": 0.05},
    "inpainting": {"N": 100, "K": 1, "start_time": 0.0, "eta": 0.01, "lmbda": 10000.0, "sigma_noise": 0.05},
    "paintbrush_inpainting": {"N": 100, "K": 1, "start_time": 0.0, "eta": 0.01, "lmbda": 10000.0,
                              "sigma_noise": 0.05},
    "random_inpainting": {"N": 100, "K": 1, "start_time": 0.0, "eta": 0.01, "lmbda": 10000.0, "sigma_noise": 0.01},
}
PRESET_OF = {"denoising": "ictm_celeba_denoise", "gaussian_deblurring_FFT": "ictm_celeba_deblur",
             "superresolution": "ictm_celeba_sr2", "inpainting": "ictm_celeba_inpaint_box",
             "paintbrush_inpainting": "ictm_celeba_inpaint_freeform",
             "random_inpainting": "ictm_celeba_inpaint_random"}


pytestmark = pytest.mark.usefixtures("one_thread")




def hut_estimator(v, inp, t, eps):
    """pnpflow/utils.py ``hut_estimator`` with NO_test = 1, transcribed; ``eps`` (1, B, C, H, W) is the probe the
    official code draws as ``(torch.rand(...) < 0.5) * 2 - 1``."""
    batch_size = inp.shape[0]

    def fn(x):
        x = x.reshape(batch_size, *inp.shape[1:])
        return v(x, t).reshape(1, batch_size, *inp.shape[1:])

    inp_new = inp.repeat(1, 1, 1, 1, 1).clone()
    prod = torch.autograd.functional.jvp(fn, inp_new, eps, create_graph=True)[1]
    return (prod * eps).sum(dim=(2, 3, 4)).mean(0)


def official_ictm(model_forward, H, y, x_init, setting, probe, trace_sign=1.0, score=True):
    """``FLOW_PRIORS.solve_ip`` for Gaussian noise, transcribed (``trace_sign`` and ``score`` are the mutations)."""
    N, K, lmbda, eta = setting["N"], setting["K"], setting["lmbda"], setting["eta"]
    if setting["start_time"] > 0.0:
        eps = 1 * setting["start_time"]
        dt = (1 - eps) / N
    else:
        dt = 1. / N
        eps = 1e-3
    x = x_init.clone()
    for iteration in range(N):
        num_t = iteration / N * (1 - eps) + eps
        t = num_t
        x = x.detach().clone()
        x.requires_grad = True
        optim_img = torch.optim.Adam([x], lr=eta)
        for _ in range(K):
            pred = model_forward(x, num_t)
            x_next = x + pred * dt
            y_next = (t + dt) * y + (1 - (t + dt)) * H(x_init)
            trace_term = trace_sign * hut_estimator(model_forward, x, num_t, probe((1, *x.shape)))
            loss = lmbda * torch.sum((H(x_next) - y_next) ** 2, dim=(1, 2, 3))
            if iteration == 0:
                loss += 0.5 * torch.sum(x ** 2, dim=(1, 2, 3)) + trace_term * dt
            else:
                loss += trace_term * dt
            loss = loss.sum()
            optim_img.zero_grad()
            grad = torch.autograd.grad(loss, x, create_graph=False)[0]
            if iteration > 0 and score:
                grad = grad + (- 1.0 / (1.0 - num_t) * (-x + num_t * pred.detach())).detach()
            x.grad = grad
            optim_img.step()
        x = x + model_forward(x, num_t) * dt
    return x.detach()


def _problem(problem, seed=1):
    op = OPERATORS[problem]()
    x_true = FLOW.sample_prior(BATCH, _gen(seed), dtype=torch.float64)
    clean = op(x_true)
    noise = torch.randn(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    return op, clean + OFFICIAL[problem]["sigma_noise"] * noise


def _official(problem, op, y, noise_seed=7, gaussian_probe=False, trace_sign=1.0, score=True, **changes):
    noise = _gen(noise_seed)
    # flowsteer draws x_init in the analytic model's float64 and keeps it as float32, then one probe per Adam
    # iteration as the signs of float32 normal draws: the same stream here
    x_init = torch.randn((BATCH, *FLOW.shape), generator=noise, dtype=torch.float64).float().double()

    def probe(shape):
        draw = torch.randn(shape, generator=noise).double()
        return draw if gaussian_probe else torch.where(draw >= 0, 1.0, -1.0).double()

    model_forward = lambda x, t: -FLOW.velocity(x, 1 - t, grad=True)  # noqa: E731  (official time and sign)
    matrix = FLOW.measurement_matrix(op)  # H as a dense float64 matrix
    H = lambda x: (x.reshape(len(x), -1) @ matrix.T).reshape(len(x), *y.shape[1:])  # noqa: E731
    with torch.enable_grad():
        return official_ictm(model_forward, H, y, x_init, {**OFFICIAL[problem], **changes}, probe, trace_sign, score)


@functools.lru_cache(maxsize=None)
def _reference(problem, **changes):
    """The official loop on ``problem``'s measurement (cached: several tests compare against the same run)."""
    op, y = _problem(problem)
    return _official(problem, op, y, **changes)


def _flowsteer(problem, op, y, noise_seed=7, official_dt=True, num_steps=None, **overrides):
    preset = PRESETS[PRESET_OF[problem]]
    # the parity variant (get_preset(name, official_quirks=True)): the official step dt = 1/N
    options = {**preset["options"], **(preset["parity"]["options"] if official_dt else {}), **overrides}
    objective = MeasurementFidelity(op, y.float(), **preset["objective"])
    return ictm(FLOW, objective, num_steps=num_steps or preset["num_steps"], generator=_gen(noise_seed),
                progress=False, **options)


def _error(out, reference):
    return float((out.x.double() - reference).abs().max())


# -- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", list(OPERATORS))
def test_the_published_settings_reproduce_the_official_loop(problem):
    op, y = _problem(problem)
    reference = _reference(problem)
    out = _flowsteer(problem, op, y)
    assert out.nfe == 200 and out.info["network_backward_passes"] == 100 and out.info["loss"].shape == (BATCH,)
    assert out.sigmas.shape == (101,) and out.x.shape == (BATCH, 3, 4, 4)
    assert _error(out, reference) < TOLERANCE, f"{problem}: max |flowsteer - official| = {_error(out, reference):.2e}"


def test_the_default_grid_is_the_official_start_time_branch_and_the_comparison_catches_mutations():
    """flowsteer's own step (1 − t_ε) / N is the official code run with start_time = t_ε > 0; against it the
    official dt = 1/N, a dropped score term (−∇ log p_t after the first step) and Gaussian instead of Rademacher
    probes each show at many times the tolerance (denoising, λ = 100, is the published setting where the prior terms
    weigh most). Without the data term (λ = 0, 30 steps) the Hutchinson term steers every pixel: the runs agree, and
    a flipped or dropped trace term shows."""
    op, y = _problem("denoising")
    out = _flowsteer("denoising", op, y, official_dt=False)
    assert _error(out, _reference("denoising", start_time=1e-3)) < TOLERANCE
    for changes in ({}, {"start_time": 1e-3, "score": False}, {"start_time": 1e-3, "gaussian_probe": True}):
        assert _error(out, _reference("denoising", **changes)) > 100 * TOLERANCE, changes
    prior_only = _flowsteer("denoising", op, y, official_dt=False, data_weight=0.0, num_steps=30)
    assert _error(prior_only, _reference("denoising", start_time=1e-3, lmbda=0.0, N=30)) < TOLERANCE
    for trace_sign in (0.0, -1.0):
        changed = _reference("denoising", start_time=1e-3, lmbda=0.0, N=30, trace_sign=trace_sign)
        assert _error(prior_only, changed) > 100 * TOLERANCE, trace_sign


def test_the_grid_and_its_official_step():
    levels, h = ictm_grid(4, 0.2)
    torch.testing.assert_close(torch.tensor(levels), torch.tensor([0.8, 0.6, 0.4, 0.2]))
    assert h == pytest.approx(0.2) and ictm_grid(4, 0.2, official_dt=True)[1] == 0.25


def test_the_data_weight_follows_the_objective_weight_and_reduction():
    """λ multiplies the objective's own form: λ with weight 2 and reduction "sum" is λ · 2 / m with "mean"."""
    op, y = _problem("superresolution")
    run = lambda data_weight, **objective: ictm(  # noqa: E731
        FLOW, MeasurementFidelity(op, y.float(), **objective), num_steps=5, generator=_gen(1), progress=False,
        data_weight=data_weight, step_size=0.1).x
    torch.testing.assert_close(run(10.0, weight=2.0), run(20.0 * y[0].numel(), reduction="mean"), rtol=0, atol=1e-6)


def test_the_default_reduces_the_residual_against_unguided_sampling():
    op = make_operator("inpaint_box:size=2", noise_std=0.05)
    x_true = FLOW.sample_prior(4, _gen(3))
    y = op.measure(x_true, _gen(4))
    guided = ictm(FLOW, MeasurementFidelity(op, y), num_steps=20, generator=_gen(5), progress=False, step_size=0.05)
    unguided = get_method("unguided")(FLOW, num_steps=20, generator=_gen(5), batch_size=4, progress=False)
    residual = lambda x: float((op(x) - y).square().sum(dim=(1, 2, 3)).mean())  # noqa: E731
    assert residual(guided.x) < 0.2 * residual(unguided.x)


def test_a_pixel_network_with_attention_is_differentiated_twice():
    """The Hutchinson term's gradient is a second derivative of the network: a diffusers UNet with self-attention
    (whose fused CPU / CUDA attention kernels have no double backward) runs, through the math kernel."""
    from diffusers import UNet2DModel

    from guidance.backbones.generic import GenericFlowModel

    torch.manual_seed(0)
    network = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8).eval()
    model = GenericFlowModel(network, None, timestep_scale=1000.0)
    op = make_operator("sr:factor=2")
    y = op(torch.rand(1, 3, 8, 8, generator=_gen(0)) * 1.6 - 0.8)
    out = ictm(model, MeasurementFidelity(op, y), num_steps=2, height=8, width=8, generator=_gen(1), progress=False)
    assert out.nfe == 4 and bool(torch.isfinite(out.x).all())


# -- refusals ------------------------------------------------------------------------------------------------

class _LatentModel:
    spatial_factor = 8
    codec = object()


def _objective(spec="denoise"):
    op = make_operator(spec)
    return MeasurementFidelity(op, op(FLOW.sample_prior(1, _gen(0))))


@pytest.mark.parametrize("options, match", [
    ({"inner_steps": 0}, "inner_steps must be .* use the 'unguided' method"),
    ({"inner_steps": 1.5}, "inner_steps must be"),
    ({"step_size": -0.01}, "step_size must be a number >= 0"),
    ({"data_weight": float("inf")}, "data_weight must be a finite number"),
    ({"start_time": -0.1}, "start_time must be a number >= 0"),
    ({"start_time": 1.0}, "start_time must be below 1"),
    ({"official_dt": "yes"}, "official_dt must be True or False"),
    ({"official_dt": True, "start_time": 0.0}, "official_dt=True changes nothing with start_time 0"),
    ({"num_steps": 0}, "num_steps must be"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        ictm(FLOW, _objective(), progress=False, **{"num_steps": 2, **options})


def test_latent_models_and_objectives_without_a_linear_pixel_operator_are_refused():
    with pytest.raises(ValueError, match="ictm works on pixel-space models only .* use flowdps, psld, d_flow"):
        ictm(_LatentModel(), _objective(), progress=False)
    nonlinear = make_operator("function:fn=torch:tanh")
    with pytest.raises(ValueError, match="linear operator .* nonlinear FunctionOperator"):
        ictm(FLOW, MeasurementFidelity(nonlinear, torch.zeros(1, 3, 4, 4)), progress=False)
    latent = MeasurementFidelity(make_operator("inpaint_box:size=2"), torch.zeros(1, 3, 4, 4), space="latent")
    with pytest.raises(ValueError, match="a latent-space fidelity"):
        ictm(FLOW, latent, progress=False)


# -- the presets ---------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    assert set(PRESETS) == set(PRESET_OF.values())
    for problem, setting in OFFICIAL.items():
        preset = PRESETS[PRESET_OF[problem]]
        assert preset["method"] == "ictm" and preset["num_steps"] == setting["N"]
        # the official start_time 0 is t_ε = 1e-3 with the step 1/N: the parity variant
        assert preset["options"] == {"inner_steps": setting["K"], "step_size": setting["eta"],
                                     "data_weight": setting["lmbda"], "start_time": 1e-3}
        assert preset["parity"] == {"options": {"official_dt": True}}
        assert set(preset["quirks"]) == {"step_not_grid_spacing"}
        assert preset["objective"] == {"space": "pixel", "weight": 1.0, "reduction": "sum"}
        assert preset["noise_std"] == setting["sigma_noise"] and preset["resolution"] == 128
        assert "ee5b159e6edff4d585ebf36c9a5333ffa85e066c" in preset["source"] and "NeurIPS 2024" in preset["source"]
        assert problem in preset["note"]
        get_method("ictm", **preset["options"], **preset["parity"]["options"])
        for spec in preset["operators"]:
            make_operator(spec)
