"""Guided methods stop with a DivergenceError when the state's scale leaves what unguided sampling produces
(per-sample RMS above DIVERGENCE_FACTOR times max(1, RMS of the data / starting noise)), not only on NaN / inf;
check_divergence=False turns the check off."""

import warnings

import pytest
import torch
from tiny_models import PROMPT

from guidance import AnalyticGMMFlow, DivergenceError, MeasurementFidelity, get_method
from guidance.methods.common import DIVERGENCE_FACTOR, WARNING_FACTOR, reference_scale, state_rms
from operators import as_operator
from operators.base import operator_gain
from tasks.studies.analytic_benchmark import smooth_image_prior

FLOW = smooth_image_prior()  # 1x8x8, pixel values in about [-1, 1]
GAIN = 5.0  # ‖A‖², as deepinv's compressed sensing (5.5)
SCALE_ERROR = r"diverged: the state's scale \(per-sample RMS\) reached [0-9.e+]+, [0-9.e+]+× its reference scale 1 "


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _dense_operator():
    """x ↦ M x with a dense random 64 x 64 matrix M scaled so that its top singular value² is GAIN."""
    g = torch.randn(64, 64, generator=_gen(7), dtype=torch.float64)
    m = (GAIN ** 0.5 * g / torch.linalg.matrix_norm(g, 2)).float()
    return as_operator(lambda x: (x.flatten(1) @ m.T).reshape(x.shape), linear=True,
                       adjoint=lambda y: (y.flatten(1) @ m).reshape(y.shape))


OPERATOR = _dense_operator()
X_TRUE = FLOW.sample_prior(4, _gen(1))
FIDELITY = MeasurementFidelity(OPERATOR, OPERATOR(X_TRUE))
SENSIBLE_STEP = 0.5 / GAIN  # flowchef's default step for ‖A‖² = 1, divided by ‖A‖²


def _run(method, model=FLOW, objective=FIDELITY, **options):
    """Run ``method`` for 20 steps; returns (result, per-step maximum state RMS)."""
    scales = []

    def record(step, sigma, state):
        scales.append(float(state_rms(state["x"]).max()))
        return state

    out = get_method(method, **options)(model, objective, num_steps=20, generator=_gen(2), progress=False,
                                        decode=False, on_step_end=record)
    return out, scales


def test_the_operator_has_the_intended_gain():
    assert operator_gain(OPERATOR, (1, 1, 8, 8)) == pytest.approx(GAIN, rel=0.05)  # a power-iteration estimate


def test_flowchef_with_a_step_ten_times_too_large_stops_at_the_scale_bound():
    with pytest.raises(DivergenceError, match="flowchef " + SCALE_ERROR + r".* at step (\d+); use a smaller "
                                              r"step_size than 1.0, or normalize_step=True") as caught:
        _run("flowchef", step_size=10 * SENSIBLE_STEP)
    step = int(caught.value.args[0].split(" at step ")[1].split(";")[0])
    # without the check the same run passes the bound at that step, still finite, and keeps growing
    out, scales = _run("flowchef", step_size=10 * SENSIBLE_STEP, check_divergence=False)
    assert max(scales[:step]) <= DIVERGENCE_FACTOR < scales[step] < 1e6
    assert scales[-1] > 100 * DIVERGENCE_FACTOR


def test_flowchef_with_a_sensible_step_runs_and_restores():
    unguided, _ = _run("unguided")
    for options in ({"step_size": SENSIBLE_STEP}, {"normalize_step": True}):
        out, scales = _run("flowchef", **options)
        assert max(scales) < 2  # the noise's scale: far below the bound
        assert (out.x - X_TRUE).square().mean() < 0.1 * (unguided.x - X_TRUE).square().mean()


@pytest.mark.parametrize("method, options", [
    # FLAIR's pixel-model default is 0.9 / (w ‖A‖²); 10x that makes each data step amplify the residual
    ("flair", {"crw": 0.5, "data_lr": 10 * 0.9 / (0.5 * GAIN)}),
    # DPS moves x by ζ ∇‖y − A x0_hat‖, a gradient of norm about ‖A‖: ζ = 1e4 against the default 0.5
    ("dps", {"step_size": 1e4}),
    # PnP-Flow's γ = 0.5 suits ‖A‖² <= 1; 10x it at ‖A‖² = 5
    ("pnp_flow", {"step_size": 5.0}),
])
def test_a_far_too_large_step_stops_other_methods_at_the_scale_bound(method, options):
    with pytest.raises(DivergenceError, match=method + " " + SCALE_ERROR):
        _run(method, **options)
    out, scales = _run(method, check_divergence=False, **options)  # the check off: it runs to the end
    assert len(scales) == 20 and max(scales) > DIVERGENCE_FACTOR


def test_flowchef_edit_with_a_far_too_large_step_stops_at_the_scale_bound(sd3):
    source = torch.rand(1, 3, 32, 32, generator=_gen(5)) * 2 - 1
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1
    # Adam's first update moves every element by about step_size: 1e4 against the reference's 0.5
    edit = dict(source_image=source, mask=mask, source_prompt=PROMPT, edit_prompt="a white cat", source_steps=3,
                optimizer="adam", step_size=1e4)
    with pytest.raises(DivergenceError, match="flowchef_edit " + SCALE_ERROR + r".* at step 0"):
        _run("flowchef_edit", model=sd3, objective=None, **edit)
    out, scales = _run("flowchef_edit", model=sd3, objective=None, check_divergence=False, **edit)
    assert len(scales) == 20 and max(scales) > DIVERGENCE_FACTOR


def test_the_reference_is_the_larger_of_one_the_data_and_the_starting_state():
    noise = torch.randn(3, 1, 8, 8, generator=_gen(3))
    torch.testing.assert_close(reference_scale(FLOW, noise), state_rms(noise).clamp_min(1))
    assert float(reference_scale(FLOW, 0.1 * noise).max()) == 1.0
    far = AnalyticGMMFlow(torch.ones(1), torch.full((1, 64), 300.0), 0.01 * torch.eye(64)[None], (1, 8, 8))
    assert float(reference_scale(far, noise).min()) == pytest.approx(300.0, rel=1e-3)


def test_a_prior_of_large_scale_does_not_trip_the_bound():
    # unguided states of this prior end at RMS 300, three times the bound of a unit-scale model; the prior's own
    # RMS sets its reference, so a run that reproduces unguided sampling (step 0) passes
    far = AnalyticGMMFlow(torch.ones(1), torch.full((1, 64), 300.0), 0.01 * torch.eye(64)[None], (1, 8, 8))
    out, scales = _run("flowchef", model=far, step_size=0.0)
    assert scales[-1] == pytest.approx(300.0, rel=0.01)


def test_a_run_that_goes_far_off_below_the_bound_finishes_with_a_warning():
    """A step 40 % above the default on ‖A‖² = 5 ends 35× beyond the prior's scale (MSE several hundred times
    unguided sampling's) without reaching the bound: the run finishes, and says so."""
    with pytest.warns(UserWarning, match=r"flowchef: the state's scale reached [0-9.]+× its reference at step \d+ "
                                         r".*normalize_step=True") as caught:
        out, scales = _run("flowchef", step_size=0.7)
    assert WARNING_FACTOR < max(scales) < DIVERGENCE_FACTOR
    assert len([w for w in caught if "state's scale" in str(w.message)]) == 1
    unguided, _ = _run("unguided")
    assert (out.x - X_TRUE).square().mean() > 100 * (unguided.x - X_TRUE).square().mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default step stays within normal scales: no warning
        _run("flowchef", step_size=0.5)
