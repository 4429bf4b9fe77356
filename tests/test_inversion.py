"""guidance.invert and the ODE solvers of guidance.solvers: the official RF-Solver and FireFlow loops transcribed in
float64, the solvers' orders against the exact inverse of a Gaussian flow, and invert-then-sample round trips."""

import math

import numpy as np
import pytest
import torch

import guidance
from official_rf_loops import denoise
from guidance import AnalyticGMMFlow, invert, sample
from guidance.solvers import evaluations

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANCES = torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
MEAN = torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def gaussian():
    """A Gaussian data distribution N(mu, diag(var)) on (1, 2, 2): the flow map is linear, and the noise from which
    the ODE generates x0 is exactly (x0 - mu) / sqrt(var)."""
    return AnalyticGMMFlow([1.0], MEAN[None], torch.diag(VARIANCES)[None], (1, 2, 2))


def exact_noise(x0: torch.Tensor) -> torch.Tensor:
    return ((x0.double().flatten(1) - MEAN) / VARIANCES.sqrt()).reshape(x0.shape)


@pytest.mark.parametrize("kind", ["rf_solver", "fireflow"])
def test_inversion_equals_the_official_loop(kind):
    from tasks.studies.analytic_benchmark import smooth_image_prior

    flow = smooth_image_prior(shape=(3, 4, 4), components=3)
    x0 = flow.sample_prior(2, torch.Generator().manual_seed(1))
    n = 6
    timesteps = [float(s) for s in flow.sigmas(n).double()]  # the model's schedule, 1 -> 0

    def velocity(x, s):
        return flow.velocity(x.float(), torch.tensor(s, dtype=torch.float32)).double()

    reference = denoise(velocity, x0.double(), timesteps, True, kind)  # denoise(..., inverse=True)
    ours = invert(flow, latents=x0, num_steps=n, solver=kind, progress=False)
    error = (ours.noise.double() - reference).abs().max().item()
    assert error < 2e-5, error  # measured 1e-6 to 4e-6
    other = "fireflow" if kind == "rf_solver" else "rf_solver"  # mutation: the other second-order solver
    assert (invert(flow, latents=x0, num_steps=n, solver=other, progress=False).noise.double()
            - reference).abs().max() > 100 * 2e-5
    assert ours.nfe == evaluations(kind, n) == (2 * n if kind == "rf_solver" else n + 1)


def _slope(steps, errors) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def test_the_solvers_orders_against_the_exact_inverse(gaussian):
    """The global error of the inverted noise falls as N^-1 for Euler and at least as N^-2 for RF-Solver and FireFlow
    (measured slopes 0.96, 3.1 and 2.2 over 8 to 64 steps: on this linear flow RF-Solver's second-order error term
    nearly cancels)."""
    x0 = gaussian.sample_prior(8, torch.Generator().manual_seed(0))
    truth = exact_noise(x0)
    steps = [8, 16, 32, 64]
    orders, errors = {}, {}
    for solver in ("euler", "rf_solver", "fireflow"):
        errors[solver] = [(invert(gaussian, latents=x0, num_steps=n, solver=solver, progress=False).noise.double()
                           - truth).abs().max().item() for n in steps]
        orders[solver] = _slope(steps, errors[solver])
    assert 0.85 < orders["euler"] < 1.2, (orders, errors)
    assert 1.8 < orders["rf_solver"] < 3.5, (orders, errors)
    assert 1.8 < orders["fireflow"] < 2.5, (orders, errors)
    assert errors["rf_solver"][-1] < errors["euler"][-1] / 20


@pytest.mark.parametrize("solver", ["euler", "rf_solver", "fireflow"])
def test_sampling_the_inverted_noise_with_the_same_solver_reconstructs(gaussian, solver):
    x0 = gaussian.sample_prior(4, torch.Generator().manual_seed(2))
    errors = []
    for n in (10, 40):
        inverted = invert(gaussian, latents=x0, num_steps=n, solver=solver, progress=False)
        back = sample(gaussian, latents=inverted.noise, num_steps=n, solver=solver, progress=False, decode=False).x
        errors.append((back - x0).abs().max().item())
    order = math.log(errors[0] / errors[1]) / math.log(4)
    assert order > (0.8 if solver == "euler" else 1.7), errors
    assert errors[1] < (0.1 if solver == "euler" else 2e-3), errors


def test_a_partial_inversion_resumes_where_sampling_starts(gaussian):
    x0 = gaussian.sample_prior(2, torch.Generator().manual_seed(3))
    n, strength = 10, 0.55
    seen = []
    inverted = invert(gaussian, latents=x0, num_steps=n, strength=strength, solver="fireflow", return_trajectory=True,
                      progress=False, on_step_end=lambda i, s, state: seen.append((i, float(s))) or state)
    assert inverted.start_step == int(n - n * strength) == 4
    sigmas = gaussian.sigmas(n)
    assert len(inverted.trajectory) == 7 and torch.equal(inverted.trajectory[0], x0)
    assert torch.equal(inverted.trajectory[-1], inverted.noise)
    assert seen == [(n - 1 - k, pytest.approx(float(sigmas[n - 1 - k]))) for k in range(6)]
    steps = []
    back = sample(gaussian, latents=inverted.noise, num_steps=n, strength=strength, solver="fireflow", progress=False,
                  decode=False, callback=lambda state: steps.append(state["step"])).x
    assert steps == [4, 5, 6, 7, 8, 9]
    assert (back - x0).abs().max() < 2e-3
    assert inverted.nfe == 7


def test_euler_sampling_is_unchanged_by_the_solver_argument(gaussian):
    g = [torch.Generator().manual_seed(4)]
    plain = sample(gaussian, num_steps=5, generator=g, progress=False, decode=False).x
    named = sample(gaussian, num_steps=5, generator=[torch.Generator().manual_seed(4)], solver="euler",
                   progress=False, decode=False).x
    assert torch.equal(plain, named)


def test_inverting_an_image_on_the_default_model_round_trips():
    model = guidance.load_model("default")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    latent = model.encode(image)
    errors = {}
    for solver in ("euler", "rf_solver"):
        inverted = invert(model, image, num_steps=8, solver=solver, progress=False)
        assert torch.allclose(inverted.latent, latent)
        back = sample(model, latents=inverted.noise, num_steps=8, solver=solver, progress=False, decode=False).x
        errors[solver] = (back - latent).pow(2).mean().sqrt().item()
    assert errors["rf_solver"] < errors["euler"], errors


def test_bad_inversion_inputs_fail_in_one_line(gaussian):
    x0 = gaussian.sample_prior(1, torch.Generator().manual_seed(6))
    cases = [
        (dict(), "needs the image to invert or its clean latents"),
        (dict(image=torch.zeros(1, 1, 2, 2), latents=x0), "one of them"),
        (dict(latents=x0, solver="heun"), "solver must be one of 'euler', 'rf_solver', 'fireflow'"),
        (dict(latents=x0, strength=0.0), r"strength must be a number in \(0, 1\]"),
        (dict(latents=x0, return_trajectory="yes"), "return_trajectory must be True or False"),
        (dict(image=torch.zeros(1, 3, 2, 2)), r"image must be \(B, 1, H, W\)"),
        (dict(latents=x0 * float("nan")), "NaN or infinite"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            invert(gaussian, progress=False, **kwargs)
    with pytest.raises(ValueError, match="pass latents"):
        sample(gaussian, num_steps=4, strength=0.5, progress=False)
    with pytest.raises(ValueError, match="solver='euler'"):
        sample(gaussian, num_steps=4, stochastic=True, solver="fireflow", generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="model must be a FlowModel"):
        invert("default", latents=x0)
