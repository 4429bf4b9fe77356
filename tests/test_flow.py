"""float64 round trips of the time convention in guidance.flow."""

import pytest
import torch

from guidance import flow


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    return x0, eps


@pytest.mark.parametrize("sigma", [0.0, 0.2, 0.5, 0.93, 1.0])
def test_interpolate_endpoints_and_mix(pair, sigma):
    x0, eps = pair
    x = flow.interpolate(x0, eps, sigma)
    torch.testing.assert_close(x, (1 - sigma) * x0 + sigma * eps, rtol=0, atol=1e-15)
    if sigma == 0.0:
        torch.testing.assert_close(x, x0, rtol=0, atol=0)
    if sigma == 1.0:
        torch.testing.assert_close(x, eps, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.77, 0.999])
def test_x0_and_eps_from_true_velocity(pair, sigma):
    x0, eps = pair
    x = flow.interpolate(x0, eps, sigma)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(x, v, sigma), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.eps_from_velocity(x, v, sigma), eps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.77, 0.95])
def test_velocity_from_x0_and_eps_invert(pair, sigma):
    x0, eps = pair
    x = flow.interpolate(x0, eps, sigma)
    v = eps - x0
    torch.testing.assert_close(flow.velocity_from_x0(x, x0, sigma), v, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.velocity_from_eps(x, eps, sigma), v, rtol=0, atol=1e-12)
    # and back again
    v_hat = flow.velocity_from_x0(x, x0, sigma)
    torch.testing.assert_close(flow.x0_from_velocity(x, v_hat, sigma), x0, rtol=0, atol=1e-12)


def test_per_sample_sigma_broadcasts(pair):
    x0, eps = pair
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x = flow.interpolate(x0, eps, sigma)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(x[i], (1 - s) * x0[i] + s * eps[i], rtol=0, atol=1e-15)
    torch.testing.assert_close(flow.x0_from_velocity(x, eps - x0, sigma), x0, rtol=0, atol=1e-12)


def test_bad_sigma_shape_raises(pair):
    x0, eps = pair
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        flow.interpolate(x0, eps, torch.full((2,), 0.5, dtype=torch.float64))


def test_euler_is_exact_on_a_straight_path(pair):
    """With the true (constant) velocity eps - x0, Euler steps stay on the line x_s for any grid."""
    x0, eps = pair
    v = flow.velocity_target(x0, eps)
    grid = [1.0, 0.83, 0.5, 0.21, 0.02, 0.0]
    x = flow.interpolate(x0, eps, grid[0])
    for s, s_next in zip(grid[:-1], grid[1:]):
        x = flow.euler_step(x, v, s, s_next)
        torch.testing.assert_close(x, flow.interpolate(x0, eps, s_next), rtol=0, atol=1e-12)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


def test_data_time_round_trip():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    t = flow.to_data_time(s)
    torch.testing.assert_close(t, 1 - s, rtol=0, atol=0)
    torch.testing.assert_close(flow.from_data_time(t), s, rtol=0, atol=1e-16)
    assert flow.to_data_time(1.0) == 0.0 and flow.from_data_time(0.25) == 0.75
    # x_s in toolkit time equals the reversed convention's x_t = t x0 + (1 - t) eps
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    t_val = 0.3
    torch.testing.assert_close(
        flow.interpolate(x0, eps, flow.from_data_time(t_val)), t_val * x0 + (1 - t_val) * eps, rtol=0, atol=1e-15
    )
