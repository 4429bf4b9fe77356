"""PnP-Flow at the published settings against a transcription of the official loop, and the presets' values.

The official code is annegnx/PnP-Flow at commit ee5b159e6edff4d585ebf36c9a5333ffa85e066c (Martin et al.,
"PnP-Flow: Plug-and-play image restoration with flow matching", ICLR 2025): the loop is
``PNP_FLOW.solve_ip`` in pnpflow/methods/pnp_flow.py, the step schedule ``gamma_style: alpha_1_minus_t`` in
config/method_config/pnp_flow.yaml, the per-problem values in scripts/script_test.sh and main.py, the operators
in pnpflow/degradations.py and pnpflow/utils.py. The transcription below runs in the official time
(t = 0 noise, t = 1 data, velocity towards the data) and float64, on the exact flow of an analytic colour prior;
flowsteer keeps its state in float32, which bounds the agreement at about 1e-6.
"""

import math

import pytest
import torch

from guidance import AnalyticGMMFlow, MeasurementFidelity
from guidance.methods import get_method
from guidance.methods.pnp_flow import PRESETS, pnp_flow, uniform_grid
from guidance.features.presets import get_preset, list_presets
from operators import make_operator
from operators.base import operator_gain
from tasks.studies.analytic_benchmark import smooth_image_prior
from official_problems import OPERATORS, decimation, gen as _gen

FLOW = smooth_image_prior(shape=(3, 4, 4), components=3)  # a small colour prior keeps 100 x 5 evaluations cheap
BATCH = 2
TOLERANCE = 2e-6  # float32 state against the float64 transcription (measured: about 3e-7)

# scripts/script_test.sh (the PnP-Flow block, dataset celeba: lr_pnp, alpha, num_samples, steps_pnp) and main.py
# (sigma_noise of each problem with noise_type 'gaussian'); the method config's gamma_style is alpha_1_minus_t.
OFFICIAL = {
    "denoising": {"lr_pnp": 1.0, "alpha": 0.8, "num_samples": 5, "steps_pnp": 100, "sigma_noise": 0.2},
    "gaussian_deblurring_FFT": {"lr_pnp": 1.0, "alpha": 0.01, "num_samples": 5, "steps_pnp": 100,
                                "sigma_noise": 0.05},
    "superresolution": {"lr_pnp": 1.0, "alpha": 0.3, "num_samples": 5, "steps_pnp": 100, "sigma_noise": 0.05},
    "inpainting": {"lr_pnp": 1.0, "alpha": 0.5, "num_samples": 5, "steps_pnp": 100, "sigma_noise": 0.05},
    "paintbrush_inpainting": {"lr_pnp": 1.0, "alpha": 0.5, "num_samples": 5, "steps_pnp": 100,
                              "sigma_noise": 0.05},
    "random_inpainting": {"lr_pnp": 1.0, "alpha": 0.01, "num_samples": 5, "steps_pnp": 100, "sigma_noise": 0.01},
}
PRESET_OF = {"denoising": "pnp_flow_celeba_denoise", "gaussian_deblurring_FFT": "pnp_flow_celeba_deblur",
             "superresolution": "pnp_flow_celeba_sr2", "inpainting": "pnp_flow_celeba_inpaint_box",
             "paintbrush_inpainting": "pnp_flow_celeba_inpaint_freeform",
             "random_inpainting": "pnp_flow_celeba_inpaint_random"}


pytestmark = pytest.mark.usefixtures("one_thread")




def official_pnp_flow(velocity_to_data, H, H_adj, y, setting, randn, times=None):
    """``PNP_FLOW.solve_ip`` for Gaussian noise, transcribed: data time t_k = k / N (or ``times``), step
    lr_pnp σ² (1 − t)^α on the gradient Hᵀ(Hx − y) / σ², re-noising t z + (1 − t) ε, denoiser x + (1 − t) v."""
    sigma = setting["sigma_noise"]
    lr = sigma**2 * setting["lr_pnp"]
    steps = setting["steps_pnp"]
    x = H_adj(torch.ones_like(y))
    for t in [k / steps for k in range(steps)] if times is None else times:
        z = x - lr * (1 - t) ** setting["alpha"] * H_adj(H(x) - y) / sigma**2
        total = torch.zeros_like(x)
        for _ in range(setting["num_samples"]):
            z_tilde = t * z + randn(z.shape) * (1 - t)
            total += z_tilde + (1 - t) * velocity_to_data(z_tilde, t)
        x = total / setting["num_samples"]
    return x


def _problem(problem, flow=FLOW, seed=1):
    op = OPERATORS[problem]()
    x_true = flow.sample_prior(BATCH, _gen(seed), dtype=torch.float64)
    clean = op(x_true)
    noise = torch.randn(clean.shape, generator=_gen(seed + 1), dtype=torch.float64)
    return op, clean + OFFICIAL[problem]["sigma_noise"] * noise


def _official(problem, op, y, flow=FLOW, noise_seed=7, times=None, **changes):
    noise = _gen(noise_seed)
    # flowsteer's re-noising draws float32 normals from the generator: the same stream, in float64 from here on
    randn = lambda shape: torch.randn(shape, generator=noise).double()  # noqa: E731
    velocity_to_data = lambda x, t: -flow.velocity(x, 1 - t)  # noqa: E731  (official time and sign)
    matrix = flow.measurement_matrix(op)  # H as a dense float64 matrix, Hᵀ its transpose
    H = lambda x: (x.reshape(len(x), -1) @ matrix.T).reshape(y.shape)  # noqa: E731
    H_adj = lambda r: (r.reshape(len(r), -1) @ matrix).reshape(len(r), *flow.shape)  # noqa: E731
    return official_pnp_flow(velocity_to_data, H, H_adj, y, {**OFFICIAL[problem], **changes}, randn, times)


def _flowsteer(problem, op, y, flow=FLOW, noise_seed=7, **overrides):
    preset = get_preset(PRESET_OF[problem])
    options = {**preset["options"], **overrides}
    start = op.adjoint(torch.ones_like(y)).float()  # the official start; the first step discards it anyway
    return pnp_flow(flow, MeasurementFidelity(op, y.float(), **preset["objective"]), num_steps=preset["num_steps"],
                    latents=start, generator=_gen(noise_seed), progress=False, **options)


# -- the loop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", list(OPERATORS))
def test_the_published_settings_reproduce_the_official_loop(problem):
    op, y = _problem(problem)
    reference = _official(problem, op, y)
    out = _flowsteer(problem, op, y)
    assert out.nfe == 500 and out.sigmas.shape == (100,) and out.x.shape == (BATCH, 3, 4, 4)
    error = float((out.x.double() - reference).abs().max())
    assert error < TOLERANCE, f"{problem}: max |flowsteer - official| = {error:.2e}"


def test_the_comparison_catches_an_unconverted_step_a_grid_off_by_one_and_other_draws():
    """The official lr_pnp is a step on ½‖Hx − y‖²: passing it unchanged as γ doubles the step; the official
    grid holds t = 0 and stops at t = (N − 1) / N, not at t = 1; each step averages 5 draws. Each mistake shows
    at many times the tolerance."""
    op, y = _problem("superresolution")
    out = _flowsteer("superresolution", op, y).x.double()
    assert float((out - _official("superresolution", op, y)).abs().max()) < TOLERANCE
    doubled = _flowsteer("superresolution", op, y, step_size=1.0).x.double()
    late = _official("superresolution", op, y, times=[(k + 1) / 100 for k in range(100)])
    fewer = _official("superresolution", op, y, num_samples=2)
    for wrong in (doubled - out, late - out, fewer - out):
        assert float(wrong.abs().max()) > 100 * TOLERANCE


class ShiftedFlow(AnalyticGMMFlow):
    """The same exact flow with an SD3-style shifted schedule s' = 3s / (1 + 2s)."""

    def sigmas(self, num_steps, height=None, width=None):
        s = super().sigmas(num_steps, height, width).double()
        return (3 * s / (1 + 2 * s)).float()


def test_the_uniform_grid_is_the_official_one_also_for_a_shifted_schedule():
    grid = uniform_grid(4)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    flow = ShiftedFlow.from_mixture(FLOW.prior)
    op, y = _problem("inpainting", flow)
    reference = _official("inpainting", op, y, flow)
    uniform = _flowsteer("inpainting", op, y, flow)
    assert float((uniform.x.double() - reference).abs().max()) < TOLERANCE
    native = _flowsteer("inpainting", op, y, flow, time_grid="model")
    assert float((native.x.double() - reference).abs().max()) > 100 * TOLERANCE
    torch.testing.assert_close(native.sigmas, flow.sigmas(100)[:100])


def test_an_unknown_time_grid_is_refused():
    op, y = _problem("denoising")
    with pytest.raises(ValueError, match="time_grid must be one of"):
        pnp_flow(FLOW, MeasurementFidelity(op, y.float()), time_grid="linear", progress=False)


# -- the presets ---------------------------------------------------------------------------------------------

def test_the_presets_carry_the_official_values():
    assert set(PRESETS) == set(PRESET_OF.values())
    assert set(PRESETS) <= set(list_presets())
    for problem, setting in OFFICIAL.items():
        preset = get_preset(PRESET_OF[problem])
        options = preset["options"]
        assert preset["method"] == "pnp_flow" and preset["num_steps"] == setting["steps_pnp"]
        # lr_pnp is a step on ½‖Hx − y‖²; flowsteer's objective ‖Ax − y‖² (sum, weight 1) has twice the gradient
        assert preset["objective"] == {"space": "pixel", "weight": 1.0, "reduction": "sum"}
        assert options["step_size"] == setting["lr_pnp"] / 2
        assert options["step_exponent"] == setting["alpha"]
        assert options["num_draws"] == setting["num_samples"]
        assert options["time_grid"] == "uniform"
        assert preset["noise_std"] == setting["sigma_noise"] and preset["resolution"] == 128
        assert "ee5b159e6edff4d585ebf36c9a5333ffa85e066c" in preset["source"] and "ICLR 2025" in preset["source"]
        assert problem in preset["note"]
        get_method("pnp_flow", **options)
        for spec in preset["operators"]:
            make_operator(spec)
    # normalize_step only where the stand-in operator's gain differs from the official one (SR: 1/4 against 1)
    assert [n for n, p in PRESETS.items() if p["options"]["normalize_step"]] == ["pnp_flow_celeba_sr2"]


def test_the_deblurring_preset_operator_is_the_official_fft_blur():
    """pnpflow/degradations.py ``GaussianDeblurring(mode="fft")`` at 128x128 (σ 1, 61 taps): the kernel placed
    at the origin and applied by FFT, i.e. a circular convolution; here on a 64x64 image (the same operator)."""
    size, taps, sigma = 64, 61, 1.0
    r = torch.arange(-taps // 2 + 1.0, taps // 2 + 1.0, dtype=torch.float64)  # pnpflow/utils.py gaussian_2d_kernel
    kernel = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    filt = torch.zeros(1, 3, size, size, dtype=torch.float64)
    filt[..., :taps, :taps] = kernel
    filt = torch.roll(filt, shifts=(-(taps - 1) // 2, -(taps - 1) // 2), dims=(2, 3))
    x = torch.randn(2, 3, size, size, generator=_gen(3), dtype=torch.float64)
    official = torch.fft.ifft2(torch.fft.fft2(x) * torch.fft.fft2(filt)).real
    op = make_operator(PRESETS["pnp_flow_celeba_deblur"]["operators"][0])
    torch.testing.assert_close(op(x.float()).double(), official, rtol=0, atol=1e-6)  # float32 taps


def test_the_box_preset_is_the_official_square_mask():
    """pnpflow/utils.py ``square_mask`` with half_size_mask 20 at 128x128 (main.py): rows and columns
    64 - 20 .. 64 + 20 (end excluded) are zeroed."""
    x = torch.ones(1, 3, 128, 128)
    official = torch.ones_like(x)
    official[:, :, 44:84, 44:84] = 0
    op = make_operator(PRESETS["pnp_flow_celeba_inpaint_box"]["operators"][0])
    assert torch.equal(op(x), official)


def test_the_sr_preset_takes_the_official_step_relative_to_the_operator_gain():
    """Decimation (official) has ‖A‖² = 1; the 2x2 average standing in has ‖A‖² = 1/4: with normalize_step the
    step on ‖Ax − y‖² is 0.5 / ‖A‖², the official lr_pnp / 2 relative to the gain."""
    stand_in = make_operator(PRESETS["pnp_flow_celeba_sr2"]["operators"][0])
    assert math.isclose(operator_gain(stand_in, (1, 3, 4, 4)), 0.25, rel_tol=1e-6)
    assert math.isclose(operator_gain(decimation(), (1, 3, 4, 4)), 1.0, rel_tol=1e-6)
