"""OT-ODE at the published settings against a transcription of the official loop, its presets and its refusals.

The official code is annegnx/PnP-Flow at commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c (run of Pokle et al.,
"Training-free Linear Image Inverses via Flows", TMLR 2024): the loop is ``OT_ODE.solve_ip`` in
pnpflow/methods/ot_ode.py with its closed-form solve per problem, steps_ode 100 in config/method_config/ot_ode.yaml,
start_time and gamma per problem in scripts/script_test.sh, the noise levels in main.py, the operators in
pnpflow/degradations.py and pnpflow/utils.py. The transcription runs in the official time (t = 0 noise, t = 1 data,
velocity towards the data), in float64, on the exact flow of an analytic colour prior, with the operator as a dense
matrix; flowsteer keeps its state in float32 and solves by conjugate gradients.
"""

import functools

import pytest
import torch

from guidance import MeasurementFidelity
from guidance.methods import get_method
from guidance.methods.ot_ode import PRESETS, first_step, ot_ode
from operators.conjugate_gradient import conjugate_gradient
from operators import make_operator
from tasks.studies.analytic_benchmark import smooth_image_prior
from official_problems import OPERATORS, gen as _gen

FLOW = smooth_image_prior(shape=(3, 4, 4), components=3)
BATCH = 2
TOLERANCE = 2e-6  # float32 state and solve against the float64 transcription (measured: at most 3.6e-7)
# conjugate gradients are exact in as many iterations as A Aᵀ has distinct eigenvalues: 1 for A = I and decimation,
# 2 for masks, at most 6 for the 4x4 circular 3-tap blur (three distinct 1-D Fourier gains, their pairwise products),
# in exact arithmetic: 8 in float32 (6 leave 1e-4 in the blur's output); the default 50 would only cost time here
CG_ITERATIONS = 8

# scripts/script_test.sh (the OT ODE block: start_time, gamma), config/method_config/ot_ode.yaml (steps_ode) and
# main.py (sigma_noise of each problem with noise_type 'gaussian')
OFFICIAL = {
    "denoising": {"start_time": 0.3, "gamma": "gamma_t", "steps_ode": 100, "sigma_noise": 0.2},
    "gaussian_deblurring_FFT": {"start_time": 0.4, "gamma": "gamma_t", "steps_ode": 100, "sigma_noise": 0.05},
    "superresolution": {"start_time": 0.1, "gamma": "constant", "steps_ode": 100, "sigma_noise": 0.05},
    "inpainting": {"start_time": 0.1, "gamma": "gamma_t", "steps_ode": 100, "sigma_noise": 0.05},
    "paintbrush_inpainting": {"start_time": 0.1, "gamma": "gamma_t", "steps_ode": 100, "sigma_noise": 0.05},
    "random_inpainting": {"start_time": 0.1, "gamma": "constant", "steps_ode": 100, "sigma_noise": 0.01},
}
PRESET_OF = {"denoising": "ot_ode_celeba_denoise", "gaussian_deblurring_FFT": "ot_ode_celeba_deblur",
             "superresolution": "ot_ode_celeba_sr2", "inpainting": "ot_ode_celeba_inpaint_box",
             "paintbrush_inpainting": "ot_ode_celeba_inpaint_freeform",
             "random_inpainting": "ot_ode_celeba_inpaint_random"}


pytestmark = pytest.mark.usefixtures("one_thread")




def official_ot_ode(velocity_to_data, H, H_adj, solve, y, setting, randn, shift=0, jacobian_sign=1.0):
    """``OT_ODE.solve_ip``, transcribed: x = t0 Hᵀy + (1 − t0) ε, then for iteration = int(N t0) .. N − 1 at
    t = iteration / N: x1_hat = x + (1 − t) v, sol = ``solve`` (the problem's closed form), vec = Hᵀ sol,
    g = vec + (1 − t) vjp(v, vec), x += (v + (1 − t) / t · gamma · g) / N. ``shift`` moves the grid by whole steps
    and ``jacobian_sign`` flips the Jacobian term (the mutations)."""
    steps, t0, sigma = setting["steps_ode"], setting["start_time"], setting["sigma_noise"]
    delta = 1 / steps
    x = t0 * H_adj(y) + (1 - t0) * randn((len(y), *FLOW.shape))
    for iteration in range(int(steps * t0), steps):
        t = delta * (iteration + shift)
        vt = velocity_to_data(x, t)
        rt_squared = (1 - t) ** 2 / ((1 - t) ** 2 + t**2)
        x1_hat = x + (1 - t) * vt
        d = y - H(x1_hat)
        vec = H_adj(solve(d, rt_squared, iteration, sigma))
        gamma = 1 if setting["gamma"] == "constant" else (t / (t**2 + (1 - t) ** 2)) ** 0.5
        g = torch.autograd.functional.vjp(lambda z: velocity_to_data(z, t), x, vec)[1]
        g = vec + jacobian_sign * (1 - t) * g
        x = x + delta * (vt + (1 - t) / t * gamma * g)
    return x


def closed_form(problem, op, matrix, H, official_sr_weight=True):
    """The official solve of (r² H Hᵀ + σ² I) sol = d for ``problem`` (pnpflow/methods/ot_ode.py), float64. The
    blur's filter is the operator's own impulse response, as ``GaussianDeblurring.filter`` is its kernel rolled
    to the origin."""
    if problem == "denoising":
        return lambda d, r2, it, sigma: d / (r2 + sigma**2)
    if problem in ("inpainting", "random_inpainting"):
        mask = H(torch.ones(1, *FLOW.shape, dtype=torch.float64))
        return lambda d, r2, it, sigma: 1 / (mask * r2 + sigma**2) * d
    if problem == "superresolution":
        diag = torch.diag(matrix @ matrix.T).reshape(1, *op(torch.zeros(1, *FLOW.shape)).shape[1:])

        def solve(d, r2, it, sigma):
            if official_sr_weight:  # (1-delta * iteration)**2 / ((1-delta * iteration)**2 + delta * iteration**2)
                delta = 1 / OFFICIAL[problem]["steps_ode"]
                r2 = (1 - delta * it) ** 2 / ((1 - delta * it) ** 2 + delta * it**2)
            return 1 / (diag * r2 + sigma**2) * d
        return solve
    fft_kernel = torch.fft.fft2(H(_impulse()))
    # the complex solution, as the official code keeps it; its Hᵀ (below) is the FFT adjoint, whose real part is taken
    return lambda d, r2, it, sigma: torch.fft.ifft2(torch.fft.fft2(d) / (r2 * fft_kernel * torch.conj(fft_kernel)
                                                                          + sigma**2))


def _impulse():
    """A unit impulse at pixel (0, 0) of every channel: H of it is the circular blur's filter per channel."""
    impulse = torch.zeros(1, *FLOW.shape, dtype=torch.float64)
    impulse[:, :, 0, 0] = 1
    return impulse


def _problem(problem, seed=1):
    op = OPERATORS[problem]()
    x_true = FLOW.sample_prior(BATCH, _gen(seed), dtype=torch.float64)
    clean = op(x_true)
    noise = torch.randn(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    return op, x_true, clean + OFFICIAL[problem]["sigma_noise"] * noise


def _official(problem, op, y, noise_seed=7, official_sr_weight=True, **changes):
    noise = _gen(noise_seed)
    # flowsteer draws the start noise in the analytic model's float64 and keeps it as float32: the same stream here
    randn = lambda shape: torch.randn(shape, generator=noise, dtype=torch.float64).float().double()  # noqa: E731
    velocity_to_data = lambda x, t: -FLOW.velocity(x, 1 - t, grad=True)  # noqa: E731  (official time and sign)
    matrix = FLOW.measurement_matrix(op)  # H as a dense float64 matrix, Hᵀ its transpose
    H = lambda x: (x.reshape(len(x), -1) @ matrix.T).reshape(len(x), *y.shape[1:])  # noqa: E731
    H_adj = lambda r: (r.reshape(len(r), -1) @ matrix).reshape(len(r), *FLOW.shape)  # noqa: E731
    solve = closed_form(problem, op, matrix, H, official_sr_weight)
    if problem == "gaussian_deblurring_FFT":
        fft_kernel = torch.fft.fft2(H(_impulse()))
        H_adj = lambda r: torch.real(torch.fft.ifft2(torch.fft.fft2(r) * torch.conj(fft_kernel)))  # noqa: E731
    jacobian_sign = changes.pop("jacobian_sign", 1.0)
    shift = changes.pop("shift", 0)
    with torch.enable_grad():
        return official_ot_ode(velocity_to_data, H, H_adj, solve, y, {**OFFICIAL[problem], **changes}, randn,
                               shift, jacobian_sign).detach()


@functools.lru_cache(maxsize=None)
def _reference(problem, **changes):
    """The official loop on ``problem``'s measurement (cached: several tests compare against the same run)."""
    op, _, y = _problem(problem)
    return _official(problem, op, y, **changes)


def _flowsteer(problem, op, y, noise_seed=7, **overrides):
    preset = PRESETS[PRESET_OF[problem]]
    options = {**preset["options"], "noise_std": OFFICIAL[problem]["sigma_noise"], "cg_iterations": CG_ITERATIONS,
               **overrides}
    objective = MeasurementFidelity(op, y.float(), **preset["objective"])
    return ot_ode(FLOW, objective, num_steps=preset["num_steps"], generator=_gen(noise_seed), progress=False,
                  **options)


def _error(out, reference):
    return float((out.x.double() - reference).abs().max())


# -- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", list(OPERATORS))
def test_the_published_settings_reproduce_the_official_loop(problem):
    op, _, y = _problem(problem)
    sr = problem == "superresolution"
    reference = _reference(problem)
    out = _flowsteer(problem, op, y, official_sr_weight=sr)  # the SR branch's r² only where the official has it
    steps = 100 - int(100 * OFFICIAL[problem]["start_time"])
    assert out.nfe == steps and out.info["network_backward_passes"] == steps
    assert out.sigmas.shape == (steps + 1,) and float(out.sigmas[-1]) == 0.0 and out.x.shape == (BATCH, 3, 4, 4)
    assert 0 < int(out.info["cg_iterations"].max()) <= 50 * steps
    assert _error(out, reference) < TOLERANCE, f"{problem}: max |flowsteer - official| = {_error(out, reference):.2e}"


def test_superresolution_without_the_precedence_slip_is_the_other_branches_weight():
    """flowsteer's default r² = s² / (s² + (1 − s)²) is the official SR loop with ``delta * iteration**2`` read as
    (delta * iteration)**2; the official slip itself shows at far more than the tolerance."""
    op, _, y = _problem("superresolution")
    out = _flowsteer("superresolution", op, y)
    assert _error(out, _reference("superresolution", official_sr_weight=False)) < TOLERANCE
    assert _error(out, _reference("superresolution")) > 100 * TOLERANCE


def test_the_comparison_catches_a_grid_off_by_one_a_swapped_gamma_and_a_flipped_jacobian():
    """Mutations of the transcription (a grid shifted by one step, the other γ rule, the Jacobian term of
    ∂x1_hat/∂x with the wrong sign, i.e. an unconverted velocity sign) and of flowsteer (σ taken as 0.1 instead
    of the problem's 0.05) each show at many times the tolerance."""
    op, _, y = _problem("inpainting")
    out = _flowsteer("inpainting", op, y)
    assert _error(out, _reference("inpainting")) < TOLERANCE
    for changes in ({"shift": 1}, {"gamma": "constant"}, {"jacobian_sign": -1.0}):
        assert _error(out, _reference("inpainting", **changes)) > 100 * TOLERANCE, changes
    assert _error(_flowsteer("inpainting", op, y, noise_std=0.1), _reference("inpainting")) > 100 * TOLERANCE


def test_the_default_reduces_the_residual_against_unguided_sampling():
    op = make_operator("sr_avgpool:factor=2", noise_std=0.05)
    x_true = FLOW.sample_prior(4, _gen(3))
    y = op.measure(x_true, _gen(4))
    objective = MeasurementFidelity(op, y)
    guided = ot_ode(FLOW, objective, num_steps=20, generator=_gen(5), progress=False)
    unguided = get_method("unguided")(FLOW, num_steps=20, generator=_gen(5), batch_size=4, progress=False)
    residual = lambda x: float((op(x) - y).square().sum(dim=(1, 2, 3)).mean())  # noqa: E731
    assert residual(guided.x) < 0.2 * residual(unguided.x)
    assert float((guided.x - x_true).square().mean()) < 0.5 * float((unguided.x - x_true).square().mean())


def test_conjugate_gradients_solve_a_blur_system_and_leave_converged_samples_alone():
    op = make_operator("gaussian_blur:kernel_size=3,sigma=1.0,padding=circular")
    matrix = FLOW.measurement_matrix(op)
    d = torch.randn(2, 3, 4, 4, generator=_gen(0), dtype=torch.float64)
    d[1] = 0  # a zero right-hand side: u = 0, no division by zero
    system = 0.7 * matrix @ matrix.T + 0.05**2 * torch.eye(48, dtype=torch.float64)
    apply = lambda p: 0.7 * op(op.adjoint(p)) + 0.05**2 * p  # noqa: E731
    u, ran = conjugate_gradient(apply, d, max_iters=60, rtol=1e-12)
    exact = torch.linalg.solve(system, d.reshape(2, -1).T).T.reshape(d.shape)
    torch.testing.assert_close(u, exact, rtol=0, atol=1e-9)
    residual = (apply(u) - d).flatten(1).norm(dim=1) / d[0].norm()
    assert float(residual[0]) < 1e-11 and int(ran[1]) == 0 and not bool(u[1].any())


def test_noise_std_zero_runs_where_the_system_is_invertible_and_is_refused_for_holes():
    op = make_operator("sr_avgpool:factor=2")
    y = op(FLOW.sample_prior(1, _gen(2)))
    out = ot_ode(FLOW, MeasurementFidelity(op, y), num_steps=10, generator=_gen(1), progress=False)
    assert bool(torch.isfinite(out.x).all())
    box = make_operator("inpaint_box:size=2")
    with pytest.raises(ValueError, match="noise_std 0 .* singular for BoxInpainting.*pass noise_std > 0"):
        ot_ode(FLOW, MeasurementFidelity(box, box(FLOW.sample_prior(1, _gen(2)))), num_steps=10, progress=False)


def test_the_first_step_is_the_official_int_without_float_error_and_never_t_zero():
    assert [first_step(100, t) for t in (0.1, 0.2, 0.3, 0.4, 0.29)] == [10, 20, 30, 40, 29]
    assert first_step(2, 0.2) == 1 and first_step(28, 0.2) == 5


# -- refusals ------------------------------------------------------------------------------------------------

class _LatentModel:
    spatial_factor = 8
    codec = object()


def _objective(spec="denoise"):
    op = make_operator(spec)
    return MeasurementFidelity(op, op(FLOW.sample_prior(1, _gen(0))))


@pytest.mark.parametrize("options, match", [
    ({"start_time": 0.0}, "start_time must be a number > 0"),
    ({"start_time": 1.0}, "start_time must be below 1"),
    ({"start_time": "0.2"}, "start_time must be a finite number"),
    ({"gamma": "gamma"}, "gamma must be one of"),
    ({"noise_std": -0.1}, "noise_std must be a number >= 0"),
    ({"cg_iterations": 0}, "cg_iterations must be"),
    ({"official_sr_weight": 1}, "official_sr_weight must be True or False"),
    ({"start_time": 0.5, "num_steps": 1}, "starts at the last grid point"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        ot_ode(FLOW, _objective(), progress=False, **{"num_steps": 10, **options})


def test_latent_models_and_objectives_without_a_linear_pixel_operator_are_refused():
    with pytest.raises(ValueError, match="ot_ode works on pixel-space models only .* use flowdps, psld, d_flow"):
        ot_ode(_LatentModel(), _objective(), progress=False)
    nonlinear = make_operator("function:fn=torch:tanh")
    with pytest.raises(ValueError, match="linear operator .* nonlinear FunctionOperator"):
        ot_ode(FLOW, MeasurementFidelity(nonlinear, torch.zeros(1, 3, 4, 4)), progress=False)
    with pytest.raises(ValueError, match="needs a pixel-space MeasurementFidelity .* got object"):
        ot_ode(FLOW, object(), progress=False)


# -- the presets ---------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    assert set(PRESETS) == set(PRESET_OF.values())
    for problem, setting in OFFICIAL.items():
        preset = PRESETS[PRESET_OF[problem]]
        assert preset["method"] == "ot_ode" and preset["num_steps"] == setting["steps_ode"]
        assert preset["options"] == {"start_time": setting["start_time"], "gamma": setting["gamma"]}
        assert preset["objective"] == {"space": "pixel", "weight": 1.0, "reduction": "sum"}
        assert preset["noise_std"] == setting["sigma_noise"] and preset["resolution"] == 128
        assert "ee5b159e6edff4d585ebf36c9a5333ffa85e066c" in preset["source"] and "TMLR 2024" in preset["source"]
        assert problem in preset["note"]
        get_method("ot_ode", **preset["options"])
        for spec in preset["operators"]:
            make_operator(spec)
    # the SR precedence slip is the parity variant only (guidance.features.presets.get_preset(official_quirks=True))
    assert {n: p.get("parity") for n, p in PRESETS.items() if p.get("parity")} == \
        {"ot_ode_celeba_sr2": {"options": {"official_sr_weight": True}}}
    assert set(PRESETS["ot_ode_celeba_sr2"]["quirks"]) == {"sr_weight_precedence"}
