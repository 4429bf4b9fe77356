"""PnP-Flow (data step, re-noising, one-step clean estimate) on tiny SD3 / Flux models and an analytic prior."""

import pytest
import torch
from tiny_models import autograd_calls
from tiny_models import measured_fidelity as _fidelity
from tiny_models import text_case as _text_case

from guidance import DivergenceError, MeasurementFidelity, get_method
from guidance.methods.common import data_term_gain
from guidance.methods.pnp_flow import pnp_flow
from operators import make_operator
from operators.base import operator_gain
from tasks.studies.analytic_benchmark import smooth_image_prior
from tasks.studies.posterior_scores import mse_over_mmse

NOISE_STD = 0.05
FLOW = smooth_image_prior()  # 1x8x8, six nearly degenerate smooth-image components


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _problem(spec="sr:factor=2", batch=4):
    op = make_operator(spec, noise_std=NOISE_STD)
    x_true = FLOW.sample_prior(batch, _gen(1))
    return op, x_true, op.measure(x_true, _gen(2))


# -- the network is only evaluated ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_transformer_is_never_differentiated_and_no_parameter_gets_a_gradient(kind, request):
    model, cond, size = _text_case(request, kind)

    # pixel loss: the data step differentiates the VAE decoder, with respect to the latent only
    with autograd_calls(model.transformer) as calls:
        out = pnp_flow(model, _fidelity("sr:factor=2", size), cond=cond, num_steps=2, num_draws=2, height=size,
                       width=size, generator=_gen(), progress=False)
    assert len(calls) == 4 and all(not grad_on and not requires for grad_on, requires, _ in calls)
    modules = [m for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    assert all(p.grad is None for m in modules for p in m.parameters())
    assert not out.x.requires_grad and out.nfe == 4 and out.info["loss"].shape == (1,)


def test_one_iteration_is_gradient_step_then_averaged_renoised_clean_estimates():
    op, _, y = _problem()
    x1 = torch.randn(4, 1, 8, 8, generator=_gen(3))
    steps = []
    out = pnp_flow(FLOW, MeasurementFidelity(op, y), num_steps=3, num_draws=3, step_size=0.4, step_exponent=0.5,
                   latents=x1, generator=_gen(9), progress=False, callback=steps.append)
    sigmas = FLOW.sigmas(3)
    torch.testing.assert_close(out.sigmas, sigmas[:3])
    # replay the noise stream: per step, three draws of the batch's shape
    noise = _gen(9)
    x = x1
    for i in range(3):
        s = float(sigmas[i])
        gamma = 0.4 * s**0.5
        z = x - gamma * 2 * op.adjoint(op(x) - y)
        draws = [(1 - s) * z + s * torch.randn(4, 1, 8, 8, generator=noise) for _ in range(3)]
        x = torch.stack([d - s * FLOW.velocity(d, s) for d in draws]).mean(0)
        torch.testing.assert_close(steps[i]["x0_hat"], x, rtol=1e-5, atol=1e-5)
        assert steps[i]["step"] == i and float(steps[i]["sigma"]) == pytest.approx(s)
    torch.testing.assert_close(out.x, x, rtol=1e-5, atol=1e-5)
    assert out.nfe == 9


@pytest.mark.parametrize("spec", ["sr:factor=2", "inpaint_box:fraction=0.25"])
def test_a_normalised_step_is_the_step_divided_by_the_operator_gain(spec):
    op, _, y = _problem(spec)
    gain = operator_gain(op, (1, 1, 8, 8))
    assert gain == pytest.approx(0.25 if spec.startswith("sr") else 1.0, rel=0.1)
    common = dict(num_steps=3, num_draws=2, generator=None, progress=False)
    normalised = pnp_flow(FLOW, MeasurementFidelity(op, y), step_size=0.1, normalize_step=True,
                          latents=torch.randn(4, 1, 8, 8, generator=_gen(3)), **{**common, "generator": _gen(5)})
    scaled = pnp_flow(FLOW, MeasurementFidelity(op, y), step_size=0.1 / gain,
                      latents=torch.randn(4, 1, 8, 8, generator=_gen(3)), **{**common, "generator": _gen(5)})
    torch.testing.assert_close(normalised.x, scaled.x)


def test_the_gain_is_one_for_objectives_the_operator_does_not_scale():
    op, _, y = _problem("sr:factor=2")
    assert data_term_gain(MeasurementFidelity(op, y), (1, 1, 8, 8)) == pytest.approx(0.25, rel=0.1)
    assert data_term_gain(MeasurementFidelity(op, y, space="latent"), (1, 1, 8, 8)) == 1.0
    with pytest.raises(ValueError, match="normalize_step must be True or False"):
        pnp_flow(FLOW, MeasurementFidelity(op, y), normalize_step="yes", progress=False)


# -- end to end on the tiny text models ----------------------------------------------------------------------

@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_runs_end_to_end_and_is_deterministic_under_a_seed(kind, space, request):
    model, cond, size = _text_case(request, kind)
    objective = _fidelity("inpaint_box:fraction=0.25", size, space=space)
    run = get_method("pnp_flow", num_draws=2)
    common = dict(cond=cond, num_steps=3, height=size, width=size, progress=False)
    a = run(model, objective, generator=_gen(4), **common)
    b = run(model, objective, generator=_gen(4), **common)
    c = run(model, objective, generator=_gen(5), **common)
    assert torch.equal(a.x, b.x) and torch.equal(a.image, b.image)
    assert not torch.equal(a.x, c.x)
    assert a.nfe == 6 and a.image.shape == (1, 3, size, size) and torch.isfinite(a.image).all()
    unconstrained = run(model, objective, generator=_gen(4), step_size=0.0, **common)
    assert not torch.allclose(a.x, unconstrained.x)  # the data step acted


# -- quality against the exact posterior ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["inpaint_box:fraction=0.25", "sr:factor=2", "gaussian_blur:kernel_size=5,sigma=1.0"])
def test_beats_unguided_sampling_against_the_exact_posterior(spec):
    op, x_true, y = _problem(spec, batch=32)
    means = torch.stack([p.mean() for p in FLOW.posteriors(op, y, NOISE_STD)])
    objective = MeasurementFidelity(op, y)
    restored = pnp_flow(FLOW, objective, generator=_gen(1), progress=False).x
    unguided = get_method("unguided")(FLOW, objective, generator=_gen(1), batch_size=32, progress=False).x
    ratio, floor = mse_over_mmse(restored, x_true, means), mse_over_mmse(unguided, x_true, means)
    assert ratio < 0.5 * floor and ratio < 4.0, f"pnp_flow {ratio:.2f} vs unguided {floor:.2f}"


# -- bad input -----------------------------------------------------------------------------------------------

def test_negative_step_size_is_refused():
    op, _, y = _problem()
    with pytest.raises(ValueError, match="step_size must be a number >= 0"):
        pnp_flow(FLOW, MeasurementFidelity(op, y), step_size=-1.0, progress=False)


def test_fewer_than_one_draw_is_refused():
    op, _, y = _problem()
    with pytest.raises(ValueError, match="num_draws must be an integer >= 1"):
        pnp_flow(FLOW, MeasurementFidelity(op, y), num_draws=0, progress=False)


def test_an_absurd_step_size_diverges_with_an_error_naming_the_step():
    op, _, y = _problem()
    with pytest.raises(DivergenceError, match=r"pnp_flow diverged: .* at step \d+; use a smaller step_size"):
        pnp_flow(FLOW, MeasurementFidelity(op, y), num_steps=10, step_size=1e30, generator=_gen(), progress=False)
