"""Flower at the published settings against a transcription of the official loop, and the presets' values.

The official code is mehrsapo/Flower at commit 6b9eacabfc7c73c3199f379bf7d8726ac6d198e3 (Pourya, El Rawas &
Unser, "Flower: A Flow-Matching Solver for Inverse Problems", ICLR 2026): the loops are ``FLOWER.solve_ip`` with
``FLOWER.cg`` in pnpflow/methods/flower.py and ``FLOWER_COV.solve_ip`` in pnpflow/methods/flower_cov.py, the
settings in scripts/script_test_{celeba,afhq}_flower*.sh, the noise levels and sizes in main.py, the operators in
pnpflow/degradations.py and pnpflow/utils.py. The transcription below runs in the official time (t = 0 noise,
t = 1 data, velocity towards the data), in float64, with each operator as a dense matrix and its own conjugate
gradient (stopping test included), on the exact flow of an analytic colour prior; flowsteer keeps its state in
float32, which bounds the agreement at about 1e-6.
"""

import functools
import math

import numpy as np
import pytest
import torch

import guidance.methods.flower as flower_module
from guidance import AnalyticGMMFlow, MeasurementFidelity
from guidance.features.presets import get_preset, list_presets
from guidance.methods import get_method
from guidance.methods.flower import PRESETS, flower, uniform_grid
from operators.conjugate_gradient import conjugate_gradient
from operators import make_operator
from tasks.studies.analytic_benchmark import smooth_image_prior
from official_problems import OPERATORS, gen as _gen

FLOW = smooth_image_prior(shape=(3, 4, 4), components=3)
BATCH = 2
TOLERANCE = 2e-6  # float32 state against the float64 transcription (measured: 1.5e-7 to 5.9e-7 over these tests)
COMMIT = "6b9eacabfc7c73c3199f379bf7d8726ac6d198e3"

# main.py: sigma_noise of each problem with noise_type 'gaussian'
SIGMA_NOISE = {"denoising": 0.2, "gaussian_deblurring_FFT": 0.05, "superresolution": 0.05, "inpainting": 0.05,
               "random_inpainting": 0.01}
PROBLEM_OF = {"denoising": "denoise", "gaussian_deblurring_FFT": "deblur", "superresolution": "sr",
              "inpainting": "inpaint_box", "random_inpainting": "inpaint_random"}
# scripts/script_test_afhq_flower[_cov]_{1,5}_{ot,ind}.sh: steps per problem (CelebA's scripts: 100 throughout);
# the AFHQ-Cat flower_5 lines for denoising, inpainting and deblurring are commented out, as are flower_1_ot's first
# two (run in flower_1_ind)
AFHQ_STEPS = {
    ("flower", 1): {"denoising": 100, "inpainting": 100, "gaussian_deblurring_FFT": 500, "superresolution": 500,
                    "random_inpainting": 200},
    ("flower", 5): {"denoising": 100, "inpainting": 100, "gaussian_deblurring_FFT": 100, "superresolution": 500,
                    "random_inpainting": 200},
    ("flower_cov", 1): {"denoising": 100, "inpainting": 100, "gaussian_deblurring_FFT": 100, "superresolution": 500,
                        "random_inpainting": 200},
    ("flower_cov", 5): {"denoising": 100, "inpainting": 100, "gaussian_deblurring_FFT": 100, "superresolution": 500,
                        "random_inpainting": 200},
}
# main.py at dim_image 128 (CelebA) and 256 (AFHQ-Cat): blur σ, SR factor, box half size; kernel_size 61
OPERATOR_OF = {
    "celeba": {"denoising": "denoise",
               "gaussian_deblurring_FFT": "gaussian_blur:kernel_size=61,sigma=1.0,padding=circular",
               "superresolution": "sr_avgpool:factor=2", "inpainting": "inpaint_box:size=40",
               "random_inpainting": "inpaint_random:fraction=0.7"},
    "afhq": {"denoising": "denoise",
             "gaussian_deblurring_FFT": "gaussian_blur:kernel_size=61,sigma=3.0,padding=circular",
             "superresolution": "sr_avgpool:factor=4", "inpainting": "inpaint_box:size=80",
             "random_inpainting": "inpaint_random:fraction=0.7"},
}


pytestmark = pytest.mark.usefixtures("one_thread")




def official_cg(b, x0, lam, max_iter, eps, H, Ht, sigma_noise, dims=(1, 2, 3)):
    """``FLOWER.cg``, stopping test included: ``r_norm.sqrt().all()`` is one bool, and ``bool < eps`` holds only
    for False, i.e. when some sample's squared residual norm is exactly 0."""
    A = lambda x: Ht(H(x)) / sigma_noise**2 + x / lam  # noqa: E731  (FLOWER.BtB)
    x = x0.clone()
    r = b - A(x)
    p = r.clone()
    r_norm = (r ** 2).sum(dim=dims, keepdim=True)
    for i in range(max_iter):
        BTBp = A(p)
        alpha = r_norm / ((p * BTBp).sum(dim=dims, keepdim=True))
        x = x + alpha * p
        r_norm_old = r_norm.clone()
        r = r - alpha * BTBp
        r_norm = (r ** 2).sum(dim=dims, keepdim=True)
        if r_norm.sqrt().all() < eps:
            break
        beta = r_norm / r_norm_old
        p = r + beta * p
    return x, i


def official_flower(velocity_to_data, H, H_adj, noisy_img, sigma_noise, steps, num_samples, randn, randn_start,
                    cov=False, delta=None):
    """``FLOWER.solve_ip`` (``cov=False``) and ``FLOWER_COV.solve_ip`` (``cov=True``) for one batch, transcribed:
    data time t = k δ, δ = 1 / steps; x̂1 = x + (1 − t) v; CG on Hᵀ(H u) / σ² + u / λ, λ = σ_r²; then
    x = (t + δ) x* + (1 − t − δ) z0; ``num_samples`` runs averaged. Returns the result, CG's last index ``i``
    of each solve of x* and each run's final x."""
    delta = 1 / steps if delta is None else delta
    shape = (noisy_img.shape[0], *FLOW.shape)
    x_avg = torch.zeros(shape, dtype=torch.float64)
    last, runs = [], []
    for _ in range(num_samples):
        x = randn_start(shape)
        ones = torch.ones(len(x), dtype=torch.float64)
        for iteration in range(int(steps)):
            t = delta * iteration
            sigma_r = (1 - t) / np.sqrt(t**2 + (1 - t)**2)
            x_hat_1 = x + (1 - t) * velocity_to_data(x, ones * t)
            lam = sigma_r ** 2
            b = H_adj(noisy_img) / (sigma_noise**2) + x_hat_1 / lam
            if cov:
                z1 = randn(x.shape)
                z2 = randn(noisy_img.shape)
                r = z1 / sigma_r + H_adj(z2) / sigma_noise
                mu_t, i = official_cg(b, x_hat_1, lam, 100, 1e-5, H, H_adj, sigma_noise)
                eps_t, _ = official_cg(r, x_hat_1 * 0, lam, 100, 1e-5, H, H_adj, sigma_noise)
                x_star = mu_t + eps_t
            else:
                x_star, i = official_cg(b, x_hat_1, lam, 50, 1e-5, H, H_adj, sigma_noise)
            last.append(i)
            z0 = randn(x.shape)
            x = (t + delta) * x_star + (1 - t - delta) * z0
        x_avg += x
        runs.append(x)
    return x_avg / num_samples, last, runs


def _problem(problem, batch=BATCH, seed=1):
    op = OPERATORS[problem]()
    x_true = FLOW.sample_prior(batch, _gen(seed), dtype=torch.float64)
    clean = op(x_true)
    noise = torch.randn(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    return op, clean + SIGMA_NOISE[problem] * noise


def _official(problem, op, y, steps, num_samples=1, cov=False, noise_seed=7, delta=None):
    noise = _gen(noise_seed)
    # flowsteer draws a run's starting noise as its model draws it (float64 for the analytic prior) and every later
    # noise in float32: the same stream, in float64 from here on
    randn_start = lambda shape: torch.randn(shape, generator=noise, dtype=torch.float64)  # noqa: E731
    randn = lambda shape: torch.randn(shape, generator=noise).double()  # noqa: E731
    velocity_to_data = lambda x, t: -FLOW.velocity(x, 1 - t)  # noqa: E731  (official time and sign)
    matrix = FLOW.measurement_matrix(op)  # H as a dense float64 matrix, Hᵀ its transpose
    H = lambda x: (x.reshape(len(x), -1) @ matrix.T).reshape(len(x), *y.shape[1:])  # noqa: E731
    H_adj = lambda r: (r.reshape(len(r), -1) @ matrix).reshape(len(r), *FLOW.shape)  # noqa: E731
    return official_flower(velocity_to_data, H, H_adj, y, SIGMA_NOISE[problem], steps, num_samples, randn,
                           randn_start, cov, delta)


def _preset_name(problem, cov=False, num_samples=1):
    label = PROBLEM_OF[problem] if problem != "superresolution" else "sr2"
    return f"flower_celeba_{label}" + ("_cov" if cov else "") + (f"_avg{num_samples}" if num_samples > 1 else "")


def _flowsteer(problem, op, y, steps=None, cov=False, num_samples=1, noise_seed=7, model=FLOW, official_quirks=False,
               **overrides):
    preset = get_preset(_preset_name(problem, cov, num_samples), official_quirks)
    options = {**preset["options"], **overrides}
    objective = MeasurementFidelity(op, y.float(), noise_std=preset["noise_std"], **preset["objective"])
    return flower(model, objective, num_steps=steps or preset["num_steps"], generator=_gen(noise_seed),
                  progress=False, **options)


@functools.lru_cache(maxsize=None)
def _pair(problem, steps, cov=False, num_samples=1):
    """(problem's operator, y, the official result, its runs' final states, flowsteer's result), computed once."""
    op, y = _problem(problem)
    reference, _, runs = _official(problem, op, y, steps, num_samples, cov)
    return op, y, reference, runs, _flowsteer(problem, op, y, steps, cov, num_samples)


def _error(out, reference):
    return float((out.x.double() - reference).abs().max())


# -- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", list(OPERATORS))
def test_the_published_settings_reproduce_the_official_loop(problem):
    """The CelebA presets' 100 steps; 40 for the blur, whose CG runs many iterations per step."""
    steps = 40 if problem == "gaussian_deblurring_FFT" else 100
    _, _, reference, _, out = _pair(problem, steps)
    assert out.nfe == steps and out.sigmas.shape == (steps + 1,) and out.x.shape == (BATCH, 3, 4, 4)
    error = _error(out, reference)
    assert error < TOLERANCE, f"{problem}: max |flowsteer - official| = {error:.2e}"


@pytest.mark.parametrize("problem", list(OPERATORS))
def test_the_full_covariance_variant_reproduces_flower_cov(problem):
    """flower_cov.py: a second CG solve (100 iterations, from 0) on z1 / σ_r + Hᵀz2 / σ, with z1, z2 drawn before
    the step's z0. 50 steps (10 for the blur, whose CG runs many iterations per step) instead of 100."""
    steps = 10 if problem == "gaussian_deblurring_FFT" else 50
    _, _, reference, _, out = _pair(problem, steps, cov=True)
    error = _error(out, reference)
    assert error < TOLERANCE, f"{problem}: max |flowsteer - official flower_cov| = {error:.2e}"
    isotropic = _flowsteer(problem, *_pair(problem, steps, cov=True)[:2], steps=steps)
    assert _error(isotropic, reference) > 100 * TOLERANCE


def test_five_samples_average_five_runs_of_one_noise_stream():
    """num_samples 5 (the _avg5 scripts): five runs one after the other, each from its own starting noise (40
    steps each instead of 100)."""
    _, _, reference, runs, out = _pair("random_inpainting", 40, num_samples=5)
    assert out.nfe == 200
    assert _error(out, reference) < TOLERANCE
    assert _error(out, sum(runs[:4]) / 4) > 100 * TOLERANCE  # the average of four runs of the same stream


class NegatedVelocity:
    """The analytic flow with its velocity's sign flipped: the official velocity used as flowsteer's unconverted."""

    def __init__(self, flow):
        self.flow = flow

    def velocity(self, x, sigma, cond=None, grad=False):
        return -self.flow.velocity(x, sigma, cond, grad)

    def __getattr__(self, name):
        return getattr(self.flow, name)


def test_the_comparison_catches_a_wrong_sign_an_unconverted_constant_an_off_by_one_grid_and_a_cut_solve(monkeypatch):
    """A velocity of the wrong sign (v_theirs = −v), λ = σ_r instead of σ_r², a grid of N + 1 steps cut after N
    (δ = 1 / (N + 1)), and a single CG iteration for the posterior sample each show at many times the tolerance.
    (A single iteration suffices for the mean of a mask or decimation: from x̂ its residual Hᵀ(y − H x̂) / σ² lies in
    one eigenspace of HᵀH.)"""
    problem = "superresolution"
    op, y, reference, _, out = _pair(problem, 100)
    assert _error(out, reference) < TOLERANCE
    wrong_sign = _flowsteer(problem, op, y, model=NegatedVelocity(FLOW), check_divergence=False)
    late = _official(problem, op, y, 100, delta=1 / 101)[0]
    with monkeypatch.context() as patch:
        patch.setattr(flower_module, "refinement_std", lambda s: math.sqrt(s / math.sqrt(s**2 + (1 - s) ** 2)))
        unconverted = _flowsteer(problem, op, y)
    _, _, full, _, full_out = _pair(problem, 50, cov=True)
    assert _error(full_out, full) < TOLERANCE
    assert _error(_flowsteer(problem, op, y, steps=50, cov=True, cg_iterations=2), full) < TOLERANCE
    cut_solve = _flowsteer(problem, op, y, steps=50, cov=True, cg_iterations=1)
    for wrong in (wrong_sign.x.double() - reference, late - out.x.double(), unconverted.x.double() - reference,
                  cut_solve.x.double() - full):
        assert float(wrong.abs().max()) > 100 * TOLERANCE


# -- the conjugate gradient and its official stopping test -----------------------------------------------------

def test_the_official_stopping_test_compares_a_bool_and_never_stops_at_eps():
    converged = torch.full((2, 1, 1, 1), 1e-12)
    assert not bool(converged.sqrt().all() < 1e-5)  # True < 1e-5 is False: no stop, however small the residual
    assert bool(torch.tensor([[[[0.0]]], [[[1.0]]]]).sqrt().all() < 1e-5)  # one exact zero stops the whole batch


def test_the_parity_variant_runs_the_official_iterations():
    """For the blur the float64 residual never reaches exactly 0, so the official CG runs all 50 iterations of
    every solve. cg_tolerance=0 (the presets' parity variant) also stops only at an exactly zero residual (in
    float32 the residual underflows sooner), the default stops at ‖r‖ <= 1e-5, and both agree with the official
    result. One sample, as the official scripts run (batch_size_ip 1)."""
    problem = "gaussian_deblurring_FFT"
    op, y = _problem(problem, batch=1)
    reference, last, _ = _official(problem, op, y, 10)
    assert last == [49] * 10
    parity = _flowsteer(problem, op, y, steps=10, official_quirks=True)
    default = _flowsteer(problem, op, y, steps=10)
    assert int(default.info["cg_iterations"]) < int(parity.info["cg_iterations"]) <= 500
    for out in (parity, default):
        assert _error(out, reference) < TOLERANCE


def test_conjugate_gradient_freezes_each_sample_at_its_tolerance():
    """A batch of two systems, one already solved: that one never moves, the other converges."""
    matrix = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    apply = lambda u: (u.reshape(len(u), 2) @ matrix).reshape(u.shape)  # noqa: E731
    b = torch.tensor([[1.0, 2.0], [1.0, 2.0]]).reshape(2, 2, 1, 1)
    solution = torch.linalg.solve(matrix, torch.tensor([1.0, 2.0]))
    start = torch.stack([solution.reshape(2, 1, 1), torch.zeros(2, 1, 1)])
    u, ran = conjugate_gradient(apply, b, start, max_iters=50, atol=1e-5)
    assert ran.tolist()[0] == 0 and 1 <= ran.tolist()[1] <= 2
    torch.testing.assert_close(u.reshape(2, 2), solution.expand(2, 2))


# -- grids, refusals, behaviour --------------------------------------------------------------------------------

class ShiftedFlow(AnalyticGMMFlow):
    """The same exact flow with an SD3-style shifted schedule s' = 3s / (1 + 2s)."""

    def sigmas(self, num_steps, height=None, width=None):
        s = super().sigmas(num_steps, height, width).double()
        return (3 * s / (1 + 2 * s)).float()


def test_the_uniform_grid_is_the_official_one_also_for_a_shifted_schedule():
    torch.testing.assert_close(uniform_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    problem = "inpainting"
    op, y = _problem(problem)
    reference = _official(problem, op, y, 10)[0]
    shifted = ShiftedFlow.from_mixture(FLOW.prior)
    assert _error(_flowsteer(problem, op, y, steps=10, model=shifted), reference) < TOLERANCE
    native = _flowsteer(problem, op, y, steps=10, model=shifted, time_grid="model")
    assert _error(native, reference) > 100 * TOLERANCE
    torch.testing.assert_close(native.sigmas, shifted.sigmas(10))


def _objective(spec="inpaint_box:size=2", noise_std=0.05, **kwargs):
    op = make_operator(spec)
    y = op(FLOW.sample_prior(1, _gen(3)))
    return MeasurementFidelity(op, y, noise_std=noise_std, **kwargs)


class FakeLatentModel:
    spatial_factor = 8

    def velocity(self, x, sigma, cond=None, grad=False):
        raise AssertionError("never evaluated")


@pytest.mark.parametrize("options, message", [
    ({"num_samples": 0}, "num_samples"),
    ({"covariance": "diagonal"}, "covariance must be one of"),
    ({"cg_iterations": 0}, "cg_iterations"),
    ({"cg_tolerance": -1.0}, "cg_tolerance"),
    ({"time_grid": "linear"}, "time_grid must be one of"),
    ({"noise_std": 0.0}, "noise_std must be a number > 0"),
    ({"noise_std": -0.1}, "noise_std must be a number > 0"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        flower(FLOW, _objective(), num_steps=2, progress=False, **options)


def test_what_flower_cannot_solve_is_refused():
    with pytest.raises(ValueError, match="latent model; use flowdps, psld, d_flow, flowchef or flair"):
        flower(FakeLatentModel(), _objective(), num_steps=2, progress=False)
    with pytest.raises(ValueError, match="needs a pixel-space MeasurementFidelity .* got object"):
        flower(FLOW, object(), num_steps=2, progress=False)
    with pytest.raises(ValueError, match="got a latent-space fidelity; .*space='pixel'"):
        flower(FLOW, _objective(space="latent"), num_steps=2, progress=False)
    with pytest.raises(ValueError, match="with a linear operator .* got a fidelity with the nonlinear"):
        flower(FLOW, _objective("function:fn=torch:tanh"), num_steps=2, progress=False)
    noiseless = _objective(noise_std=0.0)
    with pytest.raises(ValueError, match=r"noise_std must be a number > 0, got 0; its refinement weighs the data"):
        flower(FLOW, noiseless, num_steps=2, progress=False)
    assert flower(FLOW, noiseless, num_steps=2, progress=False, noise_std=0.05).x.shape == (1, 3, 4, 4)
    op = make_operator("denoise")
    y = op(FLOW.sample_prior(2, _gen(4)))
    with pytest.raises(ValueError, match="measurement has batch 2 but 3 restorations"):
        flower(FLOW, MeasurementFidelity(op, y, noise_std=0.1), num_steps=2, batch_size=3, progress=False)


def test_the_callbacks_see_every_step_of_every_run():
    seen, ends = [], []
    out = get_method("flower", num_samples=2, covariance="full")(
        FLOW, _objective(), num_steps=3, generator=_gen(5), progress=False,
        callback=lambda state: seen.append((state["sample"], state["step"], float(state["sigma"]))),
        on_step_end=lambda i, sigma, state: ends.append((i, float(sigma))) or state)
    assert out.nfe == 6 and out.info["cg_iterations"].shape == (1,)
    assert [s[:2] for s in seen] == [(m, i) for m in range(2) for i in range(3)]
    assert [e[1] for e in ends[:3]] == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_flower_reduces_the_residual_against_unguided_sampling():
    op = make_operator("sr:factor=2")
    x_true = FLOW.sample_prior(4, _gen(6))
    y = op(x_true) + 0.05 * torch.randn(op(x_true).shape, generator=_gen(7))
    objective = MeasurementFidelity(op, y, noise_std=0.05)
    guided = flower(FLOW, objective, num_steps=20, generator=_gen(8), progress=False)
    unguided = get_method("unguided")(FLOW, objective, num_steps=20, generator=_gen(8), progress=False)
    residual = lambda x: float((op(x) - y).square().mean().sqrt())  # noqa: E731
    assert residual(guided.x) < 0.1 * residual(unguided.x)
    assert residual(guided.x) < 2 * 0.05


# -- the presets ---------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    expected = set()
    for dataset in ("celeba", "afhq"):
        for script in ("flower", "flower_cov"):
            for num_samples in (1, 5):
                for problem, sigma in SIGMA_NOISE.items():
                    spec = OPERATOR_OF[dataset][problem]
                    label = PROBLEM_OF[problem] if problem != "superresolution" else f"sr{spec[-1]}"
                    name = (f"flower_{dataset}_{label}" + ("_cov" if script == "flower_cov" else "")
                            + (f"_avg{num_samples}" if num_samples > 1 else ""))
                    expected.add(name)
                    preset = get_preset(name)
                    steps = 100 if dataset == "celeba" else AFHQ_STEPS[(script, num_samples)][problem]
                    assert preset["method"] == "flower" and preset["num_steps"] == steps, name
                    assert preset["options"] == {"num_samples": num_samples,
                                                 "covariance": "full" if script == "flower_cov" else "isotropic",
                                                 "cg_iterations": None, "cg_tolerance": 1e-5, "time_grid": "uniform"}
                    assert preset["objective"] == {"space": "pixel", "weight": 1.0, "reduction": "sum"}
                    assert preset["operators"] == [spec] and preset["noise_std"] == sigma
                    assert preset["resolution"] == (128 if dataset == "celeba" else 256)
                    assert COMMIT in preset["source"] and "ICLR 2026" in preset["source"]
                    assert f"script_test_{dataset}_{script}_{num_samples}_" in preset["source"]
                    assert f"pnpflow/methods/{script}.py" in preset["source"] and problem in preset["note"]
                    assert get_preset(name, official_quirks=True)["options"]["cg_tolerance"] == 0.0
                    get_method("flower", **preset["options"])
                    make_operator(spec)
    assert set(PRESETS) == expected and expected <= set(list_presets())
    assert flower_module.CG_ITERATIONS == {"isotropic": 50, "full": 100}  # flower.py max_iter 50, flower_cov.py 100


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_the_deblurring_presets_are_the_official_fft_blur(sigma):
    """pnpflow/degradations.py ``GaussianDeblurring(mode="fft")`` (61 taps, σ 1 at 128², σ 3 at 256²): the kernel
    placed at the origin and applied by FFT, i.e. a circular convolution; here on a 64x64 image (the same
    operator)."""
    size, taps = 64, 61
    r = torch.arange(-taps // 2 + 1.0, taps // 2 + 1.0, dtype=torch.float64)  # pnpflow/utils.py gaussian_2d_kernel
    kernel = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    filt = torch.zeros(1, 3, size, size, dtype=torch.float64)
    filt[..., :taps, :taps] = kernel
    filt = torch.roll(filt, shifts=(-(taps - 1) // 2, -(taps - 1) // 2), dims=(2, 3))
    x = torch.randn(2, 3, size, size, generator=_gen(3), dtype=torch.float64)
    official = torch.fft.ifft2(torch.fft.fft2(x) * torch.fft.fft2(filt)).real
    dataset = "celeba" if sigma == 1.0 else "afhq"
    op = make_operator(PRESETS[f"flower_{dataset}_deblur"]["operators"][0])
    torch.testing.assert_close(op(x.float()).double(), official, rtol=0, atol=1e-6)  # float32 taps


@pytest.mark.parametrize("dataset, size, half", [("celeba", 128, 20), ("afhq", 256, 40)])
def test_the_box_presets_are_the_official_square_masks(dataset, size, half):
    """pnpflow/utils.py ``square_mask``: rows and columns size/2 − half .. size/2 + half (end excluded) zeroed."""
    x = torch.ones(1, 3, size, size)
    official = torch.ones_like(x)
    official[:, :, size // 2 - half:size // 2 + half, size // 2 - half:size // 2 + half] = 0
    op = make_operator(PRESETS[f"flower_{dataset}_inpaint_box"]["operators"][0])
    assert torch.equal(op(x), official)
