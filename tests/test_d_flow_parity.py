"""D-Flow against a transcription of the official loop, its inversion against exact solutions, and its presets.

The official code is annegnx/PnP-Flow at commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c (Ben-Hamu et al.,
"D-Flow: Differentiating through Flows for Controlled Generation", ICML 2024, as run in the PnP-Flow benchmark):
``D_FLOW.solve_ip``, ``forward_flow_matching`` and ``inverse_flow_matching`` in pnpflow/methods/d_flow.py, the
constants in config/method_config/d_flow.yaml and scripts/script_test.sh, the problems in main.py. The
transcription runs in the official time (t = 0 noise, t = 1 data, velocity towards the data), in float64, on the
exact flow of an analytic colour prior, with the operator as a dense matrix and the official optimiser
(torch.optim.LBFGS, strong Wolfe, history 100). Its inversion integrates the official ODE (t from 1 down to 0)
the way torchdiffeq does, in negated time, with flowsteer's Dormand–Prince step (float64); that step itself is
checked against exact solutions below. flowsteer keeps z and the state in float32.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from guidance import AnalyticGMMFlow, MeasurementFidelity
from guidance.features import presets as presets_module
from guidance.methods import get_method
from guidance.methods import d_flow as d_flow_module
from guidance.methods.d_flow import PRESETS, d_flow, dopri5, flow_map
from guidance.objectives import CallableObjective
from operators import make_operator
from tasks.studies.analytic_benchmark import smooth_image_prior
from official_problems import OPERATORS, gen as _gen

FLOW = smooth_image_prior(shape=(3, 4, 4), components=3)
BATCH = 2
# One L-BFGS iteration (inversion, blend, T, loss, gradient, the first step and its line search): float32 z and
# state against the float64 transcription agree to float32 rounding (measured: at most 5.3e-7).
TOLERANCE = 2e-6
# The published loop, shortened to 2 outer x 3 L-BFGS iterations. From the second L-BFGS iteration on, the
# curvature pair y = ∇J(z_k+1) − ∇J(z_k) is a difference of nearby float32 gradients, and its rounding grows: the
# official loop itself, run in float32 as published, departs from its float64 transcription by up to 1.6e-3
# here. flowsteer (float32) departs from the float64 transcription by at most 5.3e-4 (measured).
LOOP_TOLERANCE = 5e-3
ONE_STEP = {"max_iter": 1, "LBFGS_iter": 1}
SHORT_LOOP = {"max_iter": 2, "LBFGS_iter": 3}

# config/method_config/d_flow.yaml (steps_euler, LBFGS_iter, start_time) with scripts/script_test.sh's overrides
# (the D FLow block, dataset celeba: lmbda, alpha, max_iter) and main.py's sigma_noise (noise_type 'gaussian').
YAML = {"steps_euler": 6, "lmbda": 0.01, "alpha": 0.1, "max_iter": 20, "LBFGS_iter": 20, "start_time": 0.0}
OFFICIAL = {
    "denoising": {"lmbda": 0.001, "alpha": 0.1, "max_iter": 3, "sigma_noise": 0.2},
    "gaussian_deblurring_FFT": {"lmbda": 0.001, "alpha": 0.1, "max_iter": 7, "sigma_noise": 0.05},
    "superresolution": {"lmbda": 0.001, "alpha": 0.1, "max_iter": 10, "sigma_noise": 0.05},
    "inpainting": {"lmbda": 0.001, "alpha": 0.1, "max_iter": 9, "sigma_noise": 0.05},
    "paintbrush_inpainting": {"lmbda": 0.001, "alpha": 0.1, "max_iter": 9, "sigma_noise": 0.05},
}
PRESET_OF = {"denoising": "d_flow_celeba_denoise", "gaussian_deblurring_FFT": "d_flow_celeba_deblur",
             "superresolution": "d_flow_celeba_sr2", "inpainting": "d_flow_celeba_inpaint_box",
             "paintbrush_inpainting": "d_flow_celeba_inpaint_freeform"}


pytestmark = pytest.mark.usefixtures("one_thread")


NOISE = {**{p: s["sigma_noise"] for p, s in OFFICIAL.items()}, "random_inpainting": 0.01}


def official_d_flow(velocity_to_data, H, H_adj, y, setting, randn):
    """``D_FLOW.solve_ip`` transcribed (one batch): invert H_adj(y) from t = 1 to t = 0 (torchdiffeq's dopri5,
    which integrates the reversed ODE in negated time), blend, then max_iter L-BFGS steps on
    Σ_b ‖H T(z) − y‖² + λ reg(z), with T ``forward_flow_matching``; returns T(z)."""
    steps, start_time = setting["steps_euler"], setting["start_time"]

    def forward_flow_matching(z):
        delta = (1 - start_time) / (steps - 1)
        for i in range(steps - 1):
            t1 = delta * i + start_time
            z = z + delta * velocity_to_data(z + delta / 2 * velocity_to_data(z, t1), t1 + delta / 2)
        return z

    x = H_adj(y)
    # odeint(cnf, x, [1.0, 0.0], method="dopri5", atol=1e-5, rtol=1e-5): with decreasing times torchdiffeq solves
    # dy/dτ = −f(−τ, y) for τ from −1 to 0
    z, _ = dopri5(lambda tau, state: -velocity_to_data(state, -tau), x, -1.0, 0.0, atol=1e-5, rtol=1e-5)
    z = np.sqrt(setting["alpha"]) * z + np.sqrt(1 - setting["alpha"]) * randn(z.shape)
    z = z.detach().requires_grad_(True)
    optim_img = torch.optim.LBFGS([z], max_iter=setting["LBFGS_iter"], history_size=100,
                                  line_search_fn="strong_wolfe")
    d = z.shape[1] * z.shape[2] * z.shape[3]
    for _ in range(setting["max_iter"]):
        def closure():
            optim_img.zero_grad()
            norm_x0 = torch.sqrt((z**2).sum([1, 2, 3]))
            reg = 0.5 * torch.clamp(norm_x0**2, min=-1e6, max=1e6) - (d - 1) * torch.log(norm_x0 + 1e-5)
            loss = (torch.sum((H(forward_flow_matching(z)) - y) ** 2, dim=(1, 2, 3)) + setting["lmbda"] * reg).sum()
            loss.backward()
            return loss
        optim_img.step(closure)
    return forward_flow_matching(z.detach())


def _problem(problem, flow=FLOW, seed=1):
    op = OPERATORS[problem]()
    x_true = flow.sample_prior(BATCH, _gen(seed), dtype=torch.float64)
    clean = op(x_true)
    noise = torch.randn(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    return op, clean + NOISE[problem] * noise


def _setting(problem, **changes):
    published = {k: v for k, v in OFFICIAL.get(problem, OFFICIAL["inpainting"]).items() if k != "sigma_noise"}
    return {**YAML, **published, **changes}


def _official(problem, op, y, iterations, flow=FLOW, noise_seed=7, **changes):
    noise = _gen(noise_seed)
    # flowsteer's blend noise is its initial noise, drawn in the model's dtype (float64 for the analytic flow) and
    # kept in float32: the same stream and rounding, in float64 from here on
    randn = lambda shape: torch.randn(shape, generator=noise, dtype=torch.float64).float().double()  # noqa: E731
    velocity_to_data = lambda x, t: -flow.velocity(x, 1 - t, grad=True)  # noqa: E731  (official time and sign)
    matrix = flow.measurement_matrix(op)  # H as a dense float64 matrix, Hᵀ its transpose
    H = lambda x: (x.reshape(len(x), -1) @ matrix.T).reshape(len(x), *y.shape[1:])  # noqa: E731
    H_adj = lambda r: (r.reshape(len(r), -1) @ matrix).reshape(len(r), *flow.shape)  # noqa: E731
    return official_d_flow(velocity_to_data, H, H_adj, y, _setting(problem, **iterations, **changes), randn)


def _flowsteer(problem, op, y, iterations, flow=FLOW, noise_seed=7, objective=None, **overrides):
    preset = PRESETS[PRESET_OF.get(problem, "d_flow_celeba_inpaint_box")]
    options = {**preset["options"], "max_iter": iterations["max_iter"], "lbfgs_iter": iterations["LBFGS_iter"],
               **overrides}
    num_steps = options.pop("num_steps", preset["num_steps"])
    fidelity = MeasurementFidelity(op, y.float(), **{**preset["objective"], **(objective or {})})
    return d_flow(flow, fidelity, num_steps=num_steps, generator=_gen(noise_seed), progress=False, **options)


def _error(out, reference):
    return float((out.x.double() - reference).abs().max())


# -- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", list(OPERATORS))
def test_one_lbfgs_iteration_reproduces_the_official_loop(problem):
    op, y = _problem(problem)
    reference = _official(problem, op, y, ONE_STEP)
    out = _flowsteer(problem, op, y, ONE_STEP)
    assert out.x.shape == (BATCH, 3, 4, 4) and out.sigmas.shape == (6,)
    assert out.info["evaluations"] == 2 and out.info["inversion_nfe"] > 10
    error = _error(out, reference)
    assert error < TOLERANCE, f"{problem}: max |flowsteer - official| = {error:.2e}"


@pytest.mark.parametrize("problem", list(OPERATORS))
def test_the_published_loop_agrees_with_the_official_one_to_float32_rounding(problem):
    op, y = _problem(problem)
    error = _error(_flowsteer(problem, op, y, SHORT_LOOP), _official(problem, op, y, SHORT_LOOP))
    assert error < LOOP_TOLERANCE, f"{problem}: max |flowsteer - official| = {error:.2e}"


def test_the_comparison_catches_an_unconverted_step_count_a_wrong_sign_and_a_wrong_blend(monkeypatch):
    """steps_euler counts grid points (6 = 5 midpoint steps): passing it as num_steps adds a step; the official
    velocity points to the data (v_theirs = −v): forgetting the sign in the inversion integrates towards the
    data; the blend takes square roots of α and 1 − α (dropping them blends 0.1 z_inv + 0.9 ε). Each mistake
    shows at more than 100 times the tolerance after one L-BFGS iteration."""
    op, y = _problem("gaussian_deblurring_FFT")
    reference = _official("gaussian_deblurring_FFT", op, y, ONE_STEP)
    assert _error(_flowsteer("gaussian_deblurring_FFT", op, y, ONE_STEP), reference) < TOLERANCE
    wrong = [_flowsteer("gaussian_deblurring_FFT", op, y, ONE_STEP, num_steps=6)]
    with monkeypatch.context() as patch:
        patch.setattr(d_flow_module, "dopri5", lambda func, *args: dopri5(lambda s, x: -func(s, x), *args))
        wrong.append(_flowsteer("gaussian_deblurring_FFT", op, y, ONE_STEP))
    with monkeypatch.context() as patch:
        patch.setattr(d_flow_module, "math", SimpleNamespace(sqrt=lambda v: v, isfinite=math.isfinite))
        wrong.append(_flowsteer("gaussian_deblurring_FFT", op, y, ONE_STEP))
    errors = [_error(out, reference) for out in wrong]
    assert min(errors) > 100 * TOLERANCE, errors  # measured: 4.9e-3, 0.79, 0.16


class ShiftedFlow(AnalyticGMMFlow):
    """The same exact flow with an SD3-style shifted schedule s' = 3s / (1 + 2s)."""

    def sigmas(self, num_steps, height=None, width=None):
        s = super().sigmas(num_steps, height, width).double()
        return (3 * s / (1 + 2 * s)).float()


def test_the_uniform_grid_is_the_official_one_also_for_a_shifted_schedule():
    flow = ShiftedFlow.from_mixture(FLOW.prior)
    op, y = _problem("inpainting", flow)
    reference = _official("inpainting", op, y, ONE_STEP, flow)
    assert _error(_flowsteer("inpainting", op, y, ONE_STEP, flow), reference) < TOLERANCE
    native = _flowsteer("inpainting", op, y, ONE_STEP, flow, time_grid="model")
    assert _error(native, reference) > 100 * TOLERANCE
    torch.testing.assert_close(native.sigmas, flow.sigmas(5))


# -- the inversion -------------------------------------------------------------------------------------------

def _solve(field, x, method="DOP853", tolerance=1e-12):
    """x at time 1 of dx/dτ = field(τ, x) from τ = 0, by scipy (DOP853 at 1e-12: exact for these tests)."""
    def flat(tau, state):
        return field(tau, torch.from_numpy(state).reshape(x.shape)).reshape(-1).numpy()
    solution = solve_ivp(flat, (0.0, 1.0), x.reshape(-1).numpy(), method=method, rtol=tolerance, atol=tolerance)
    return torch.from_numpy(solution.y[:, -1]).reshape(x.shape)


def _exact_inversion(x0, **how):
    """z = T⁻¹(x0) on the exact flow: dx/ds = v(x, s) from s = 0 to 1."""
    return _solve(lambda s, x: FLOW.velocity(x, s), x0, **how)


def _exact_forward(z):
    """T(z) on the exact flow: dx/dτ = −v(x, 1 − τ) from s = 1 to 0."""
    return _solve(lambda tau, x: -FLOW.velocity(x, 1 - tau), z)


def test_the_dopri5_inversion_matches_scipys_dormand_prince_and_converges():
    """T⁻¹ expands the prior's thin directions (covariance eigenvalues down to 1e-4: by about 100x), so the error
    in z is far above the local tolerance, for scipy's RK45 (the same Dormand–Prince pair) as for ours; the
    round trip back through the exact T contracts it again (measured at the official 1e-5: z off by 6.5e-3 in
    8 steps, scipy 6.5e-3; round trip 1.0e-4; at 1e-8: 8.4e-7 in 28 steps, scipy 4.8e-7)."""
    x0 = FLOW.sample_prior(BATCH, _gen(3), dtype=torch.float64)
    exact = _exact_inversion(x0)
    field = lambda s, x: FLOW.velocity(x, s)  # noqa: E731
    errors, attempts = {}, {}
    for tol in (1e-5, 1e-8):
        z, attempts[tol] = dopri5(field, x0, 0.0, 1.0, atol=tol, rtol=tol)
        errors[tol] = float((z - exact).abs().max())
        scipy_error = float((_exact_inversion(x0, method="RK45", tolerance=tol) - exact).abs().max())
        assert errors[tol] < 2 * scipy_error
    assert errors[1e-8] < 2e-6 and attempts[1e-8] > attempts[1e-5]
    z, _ = dopri5(field, x0, 0.0, 1.0)
    assert float((_exact_forward(z) - x0).abs().max()) < 5e-4


def test_the_midpoint_inversion_converges_at_least_at_second_order():
    x0 = FLOW.sample_prior(BATCH, _gen(3), dtype=torch.float64)
    exact = _exact_inversion(x0)
    field = lambda x, s: FLOW.velocity(x, s)  # noqa: E731
    errors = [float((flow_map(field, x0, torch.linspace(0, 1, n + 1, dtype=torch.float64)) - exact).abs().max())
              for n in (100, 200)]
    assert errors[1] < 5e-3 and errors[0] / errors[1] > 4.0  # measured: 1.8e-2, 2.0e-3


def test_the_method_starts_from_the_inverted_back_projection():
    """With α = 1 and a zero weight on both terms there is nothing to optimise: z stays T⁻¹(Aᵀy)."""
    op, y = _problem("inpainting")
    fidelity = MeasurementFidelity(op, y.float(), weight=0.0)
    out = d_flow(FLOW, fidelity, num_steps=5, alpha=1.0, lmbda=0.0, max_iter=1, lbfgs_iter=1, progress=False,
                 generator=_gen(0))
    field = lambda s, x: FLOW.velocity(x, s)  # noqa: E731
    z_inv, _ = dopri5(field, op.adjoint(y), 0.0, 1.0)
    assert float((out.info["z"].double() - z_inv).abs().max()) < 1e-5


def test_the_callbacks_see_z_and_its_sample_and_may_replace_z():
    op, y = _problem("denoising")
    seen = []
    out = d_flow(FLOW, MeasurementFidelity(op, y.float()), num_steps=3, max_iter=2, lbfgs_iter=2, progress=False,
                 generator=_gen(0), callback=seen.append,
                 on_step_end=lambda step, sigma, state: {"x": torch.full_like(state["x"], 0.5)})
    assert [info["step"] for info in seen] == [0, 1] and all(float(info["sigma"]) == 1.0 for info in seen)
    assert seen[1]["x0_hat"].shape == seen[1]["x"].shape == (BATCH, 3, 4, 4)
    assert bool((out.info["z"] == 0.5).all())  # the last replacement is the z the result comes from


# -- the presets ---------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    assert set(PRESETS) == set(PRESET_OF.values())
    assert "guidance.methods.d_flow" in presets_module._SOURCES  # gathered by guidance.features.presets
    for problem, setting in OFFICIAL.items():
        preset = PRESETS[PRESET_OF[problem]]
        options = preset["options"]
        assert preset["method"] == "d_flow" and preset["num_steps"] == YAML["steps_euler"] - 1
        assert preset["objective"] == {"space": "pixel", "weight": 1.0, "reduction": "sum"}
        assert options["lmbda"] == setting["lmbda"] and options["alpha"] == setting["alpha"]
        assert options["max_iter"] == setting["max_iter"] and options["lbfgs_iter"] == YAML["LBFGS_iter"]
        assert options["inversion"] == "dopri5" and options["atol"] == options["rtol"] == 1e-5
        assert options["time_grid"] == "uniform"
        assert preset["noise_std"] == setting["sigma_noise"] and preset["resolution"] == 128
        assert "ee5b159e6edff4d585ebf36c9a5333ffa85e066c" in preset["source"] and "ICML 2024" in preset["source"]
        assert problem in preset["note"]
        get_method("d_flow", **options)
        for spec in preset["operators"]:
            make_operator(spec)


# -- refusals, and what the method is for --------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"lmbda": -1.0}, "lmbda"),
    ({"alpha": 1.5}, "alpha"),
    ({"max_iter": 0}, "max_iter"),
    ({"lbfgs_iter": 0}, "lbfgs_iter"),
    ({"inversion": "euler"}, "inversion must be one of"),
    ({"time_grid": "linear"}, "time_grid must be one of"),
    ({"alpha": 0.0, "inversion": "dopri5"}, "alpha=0 discards the inversion"),
    ({"inversion": "midpoint", "atol": 1e-3}, "atol and rtol"),
    ({"inversion_steps": 10}, "inversion_steps"),
    ({"atol": 0.0}, "atol"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
])
def test_bad_options_are_refused(options, message):
    op, y = _problem("denoising")
    with pytest.raises(ValueError, match=message):
        d_flow(FLOW, MeasurementFidelity(op, y.float()), progress=False, **options)


def test_an_objective_without_a_linear_operator_starts_from_noise():
    """A classifier-like loss: z starts from the noise ε itself (no inversion), and α is refused."""
    target = FLOW.sample_prior(1, _gen(5))
    objective = CallableObjective(lambda x: (x - target).square().sum((1, 2, 3)))
    out = d_flow(FLOW, objective, num_steps=3, max_iter=1, lbfgs_iter=3, progress=False, generator=_gen(0))
    assert out.info["inversion_nfe"] == 0 and float(out.info["loss"][0]) < float(out.info["start_loss"][0])
    with pytest.raises(ValueError, match="drop alpha"):
        d_flow(FLOW, objective, alpha=0.1, progress=False)
    with pytest.raises(ValueError, match="needs an Objective"):
        d_flow(FLOW, lambda x: x, progress=False)


def test_it_fits_the_measurement_far_better_than_unguided_sampling():
    flow = smooth_image_prior(shape=(1, 4, 4), components=3)
    op = make_operator("inpaint_box:size=2")
    x_true = flow.sample_prior(4, _gen(2))
    y = op(x_true) + 0.05 * torch.randn(op(x_true).shape, generator=_gen(3))
    objective = MeasurementFidelity(op, y)
    guided = d_flow(flow, objective, num_steps=5, max_iter=2, lbfgs_iter=5, progress=False, generator=_gen(4))
    unguided = get_method("unguided")(flow, num_steps=10, batch_size=4, progress=False, generator=_gen(4))
    assert float(guided.info["loss"].mean()) < 0.05 * float(objective(flow, unguided.x).mean())
    assert guided.nfe > guided.info["inversion_nfe"] > 0


def test_gradient_checkpointing_changes_the_cost_not_the_result():
    op, y = _problem("gaussian_deblurring_FFT")
    with_checkpoints = _flowsteer("gaussian_deblurring_FFT", op, y, SHORT_LOOP)
    without = _flowsteer("gaussian_deblurring_FFT", op, y, SHORT_LOOP, gradient_checkpointing=False)
    torch.testing.assert_close(with_checkpoints.x, without.x, rtol=0, atol=1e-6)
    # each J evaluation recomputes the 10 velocity evaluations of T in the backward pass
    extra = with_checkpoints.nfe - without.nfe
    assert extra == 10 * with_checkpoints.info["evaluations"]


def test_a_latent_model_decodes_for_the_objective_and_lowers_the_residual():
    """The tiny SD3 pipeline (random weights, 32x32): the inversion starts from E(Aᵀy) and one outer iteration
    lowers the pixel-space residual ‖A D(T(z)) − y‖²."""
    from guidance import load_model
    from tasks.random_models import tiny_pipeline

    model = load_model(tiny_pipeline("sd3"))
    op = make_operator("inpaint_box:size=16")
    image = torch.linspace(-0.5, 0.5, 3 * 32 * 32).reshape(1, 3, 32, 32)
    objective = MeasurementFidelity(op, op(image))
    out = d_flow(model, objective, num_steps=2, height=32, width=32, max_iter=1, lbfgs_iter=4, progress=False,
                 generator=_gen(0))
    assert out.x.shape == (1, *model.latent_shape(32, 32)) and out.image.shape == (1, 3, 32, 32)
    assert out.info["inversion_nfe"] > 0
    assert float(out.info["loss"][0]) < float(out.info["start_loss"][0])
