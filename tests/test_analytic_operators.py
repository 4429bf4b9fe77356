"""Exact posteriors of the Gaussian-mixture flow for the toolkit's own linear operators."""

import pytest
import torch

from guidance.analytic.gaussian_mixture import AnalyticGMMFlow
from operators import make_operator

SPECS = {
    "sr_avgpool:factor=2": (1, 8, 8),
    "sr:factor=2": (1, 8, 8),
    "inpaint_box:fraction=0.25": (1, 8, 8),
    "inpaint_random:fraction=0.5,seed=1": (1, 8, 8),
    "gaussian_blur:kernel_size=3,sigma=1.0": (1, 8, 8),
    "motion_blur:kernel_size=5,padding='constant'": (1, 8, 8),
    "colorize": (3, 4, 4),
    "denoise": (1, 4, 4),
}


def random_prior(shape, components=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    means = torch.randn(components, d, generator=generator, dtype=torch.float64) * 0.5
    factors = torch.randn(components, d, d, generator=generator, dtype=torch.float64) / d**0.5
    covariances = 0.1 * factors @ factors.transpose(-1, -2) + 1e-2 * torch.eye(d, dtype=torch.float64)
    return AnalyticGMMFlow(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means, covariances, shape)


@pytest.mark.parametrize("spec", list(SPECS))
def test_dense_matrix_and_posterior_agree_with_the_operator(spec):
    shape = SPECS[spec]
    flow = random_prior(shape)
    op = make_operator(spec)
    a = flow.measurement_matrix(op)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(x.reshape(4, -1) @ a.T, op(x).reshape(4, -1))

    x_true = flow.sample_prior(1, torch.Generator().manual_seed(2), dtype=torch.float64)
    y = op(x_true)
    posterior = flow.posterior(op, y, noise_std=1e-4)
    mean = posterior.mean().reshape(1, *shape)
    torch.testing.assert_close(op(mean), y, rtol=0, atol=1e-3)  # the data are honoured to the noise level
    samples = posterior.sample(256, torch.Generator().manual_seed(3)).reshape(-1, *shape)
    torch.testing.assert_close(op(samples), y.expand_as(op(samples)), rtol=0, atol=1e-3)


def test_posterior_rejects_a_non_linear_operator():
    flow = random_prior((3, 4, 4))
    with pytest.raises(ValueError, match="linear"):
        flow.posterior(make_operator("jpeg"), torch.zeros(1, 3, 4, 4), noise_std=0.1)
