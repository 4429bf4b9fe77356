"""Guidance methods against the exact posterior of an analytic image prior (design: MSE / MMSE figure).

An exact posterior sampler scores 2.0 and the posterior mean 1.0; unguided sampling and broken updates
score far more. 64 pairs (x_true from the prior, y = A x_true + noise, noise std 0.05), 50 steps.
"""

import pytest
import torch

from guidance import CallableObjective, MeasurementFidelity, get_method
from operators import make_operator
from tasks.studies import posterior_scores
from tasks.studies.analytic_benchmark import NOISE_STD, OPERATORS, score, smooth_image_prior

FLOW = smooth_image_prior()
BOUNDS = {"flowchef": 3.0, "flair": 4.0}
UNGUIDED = {}


def ratio(method, spec, **options):
    return score(method, FLOW, spec, pairs=64, steps=50, spread=8, options=options).mse_over_mmse


def unguided_ratio(spec):
    if spec not in UNGUIDED:
        UNGUIDED[spec] = ratio("unguided", spec)
    return UNGUIDED[spec]


@pytest.mark.parametrize("operator", list(OPERATORS))
@pytest.mark.parametrize("method", list(BOUNDS))
def test_guided_methods_are_close_to_exact_posterior_sampling(method, operator):
    value = ratio(method, OPERATORS[operator])
    assert value <= BOUNDS[method], f"{method} on {operator}: MSE/MMSE {value:.2f} > {BOUNDS[method]}"


@pytest.mark.parametrize("operator", list(OPERATORS))
def test_unguided_sampling_fails_the_bounds(operator):
    assert unguided_ratio(OPERATORS[operator]) > max(BOUNDS.values())


@pytest.mark.parametrize("operator", list(OPERATORS))
def test_a_wrong_signed_update_fails_the_bound(operator):
    op = make_operator(OPERATORS[operator], noise_std=NOISE_STD)
    generator = torch.Generator().manual_seed(0)
    x_true = FLOW.sample_prior(64, generator)
    y = op.measure(x_true, generator)
    fidelity = MeasurementFidelity(op, y)
    ascent = CallableObjective(lambda x: -fidelity.loss(x))  # climbs the data term instead of descending it
    out = get_method("flowchef")(FLOW, ascent, num_steps=50, batch_size=64, progress=False, check_divergence=False,
                                 generator=torch.Generator().manual_seed(1)).x
    means = torch.stack([p.mean() for p in FLOW.posteriors(op, y, NOISE_STD)])
    value = posterior_scores.mse_over_mmse(torch.nan_to_num(out, nan=1e6, posinf=1e6, neginf=-1e6), x_true, means)
    assert value > BOUNDS["flowchef"]


@pytest.mark.parametrize("operator", list(OPERATORS))
@pytest.mark.parametrize("method", ["dps", "pnp_flow"])
def test_baselines_beat_unguided_sampling(method, operator):
    assert ratio(method, OPERATORS[operator]) < 0.5 * unguided_ratio(OPERATORS[operator])
