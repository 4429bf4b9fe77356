"""DPS-style guidance (backpropagation through the flow network) on tiny SD3 / Flux models and an analytic prior."""

import pytest
import torch
from tiny_models import NEGATIVE, PROMPT, autograd_calls
from tiny_models import measured_fidelity as _fidelity
from tiny_models import text_case as _text_case

from guidance import CallableObjective, DivergenceError, MeasurementFidelity, get_method, sample
from guidance.methods.dps import dps
from operators import make_operator
from tasks.studies.analytic_benchmark import smooth_image_prior
from tasks.studies.posterior_scores import mse_over_mmse

NOISE_STD = 0.05
FLOW = smooth_image_prior()  # 1x8x8, six nearly degenerate smooth-image components


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _parameters(model):
    modules = [m for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    return [p for m in modules for p in m.parameters()]


# -- the transformer IS differentiated, its parameters are not -----------------------------------------------

@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_backpropagates_through_the_transformer_with_checkpointing_and_no_parameter_gradient(kind, request):
    model, cond, size = _text_case(request, kind)
    transformer = model.transformer
    assert not transformer.is_gradient_checkpointing

    with autograd_calls(transformer) as calls:
        out = dps(model, _fidelity("sr:factor=2", size), cond=cond, num_steps=2, height=size, width=size,
                  generator=_gen(), progress=False, step_size=0.1)
    assert calls and all(grad_on and requires and checkpointing for grad_on, requires, checkpointing in calls)
    assert not transformer.is_gradient_checkpointing  # restored
    assert all(p.grad is None for p in _parameters(model))
    assert not out.x.requires_grad and out.nfe == 2 and out.info["network_backward_passes"] == 2
    assert out.info["residual"].shape == (1,) and torch.isfinite(out.info["residual"]).all()


def test_checkpointing_switch_is_honoured_and_a_previous_setting_kept(sd3):
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    seen = []
    handle = sd3.transformer.register_forward_hook(lambda m, i, o: seen.append(m.is_gradient_checkpointing))
    common = dict(cond=cond, num_steps=1, height=32, width=32, generator=_gen(), progress=False, decode=False)
    try:
        dps(sd3, _fidelity("sr:factor=2", 32), gradient_checkpointing=False, **common)
        assert seen == [False]
        sd3.transformer.enable_gradient_checkpointing()
        dps(sd3, _fidelity("sr:factor=2", 32), **common)
        assert seen[-1] is True and sd3.transformer.is_gradient_checkpointing  # the user's setting stays
    finally:
        sd3.transformer.disable_gradient_checkpointing()
        handle.remove()


def test_the_guidance_gradient_is_the_network_jacobian_transposed_times_the_residual_gradient():
    """One guided step equals Euler minus ζ Jᵀ ∇r, with J = ∂x0_hat/∂x of the exact (analytic) velocity."""
    op = make_operator("sr:factor=2", noise_std=NOISE_STD)
    x_true = FLOW.sample_prior(3, _gen(1))
    y = op.measure(x_true, _gen(2))
    x1 = torch.randn(3, 1, 8, 8, generator=_gen(3))
    sigmas = FLOW.sigmas(4)
    out = dps(FLOW, MeasurementFidelity(op, y), num_steps=4, latents=x1, window=(1, 2), step_size=0.3,
              progress=False, decode=False)
    # replay: steps 0, 2, 3 plain Euler, step 1 guided
    x = x1 + (sigmas[1] - sigmas[0]) * FLOW.velocity(x1, sigmas[0])
    x_in = x.clone().requires_grad_(True)
    x0_hat = x_in - sigmas[1] * FLOW.velocity(x_in, sigmas[1], grad=True)
    norm = (op(x0_hat) - y).flatten(1).norm(dim=1)
    (grad,) = torch.autograd.grad(norm.sum(), x_in)
    x = x + (sigmas[2] - sigmas[1]) * FLOW.velocity(x, sigmas[1]) - 0.3 * grad
    for i in (2, 3):
        x = x + (sigmas[i + 1] - sigmas[i]) * FLOW.velocity(x, sigmas[i])
    torch.testing.assert_close(out.x, x, rtol=1e-5, atol=1e-5)
    assert out.nfe == 4 and out.info["network_backward_passes"] == 1
    torch.testing.assert_close(out.info["residual"], norm.detach(), rtol=1e-5, atol=1e-6)


# -- end to end on the tiny text models ----------------------------------------------------------------------

@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_runs_end_to_end_and_is_deterministic_under_a_seed(kind, space, request):
    model, cond, size = _text_case(request, kind)
    objective = _fidelity("inpaint_box:fraction=0.25", size, space=space)
    run = get_method("dps", step_size=0.2)
    common = dict(cond=cond, num_steps=3, height=size, width=size, progress=False)
    a = run(model, objective, generator=_gen(4), **common)
    b = run(model, objective, generator=_gen(4), **common)
    c = run(model, objective, generator=_gen(5), **common)
    assert torch.equal(a.x, b.x) and torch.equal(a.image, b.image)
    assert not torch.equal(a.x, c.x)
    assert a.image.shape == (1, 3, size, size) and torch.isfinite(a.image).all()
    unguided = sample(model, generator=_gen(4), **common)
    assert not torch.allclose(a.x, unguided.x)  # the guidance acted


# -- quality against the exact posterior ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["inpaint_box:fraction=0.25", "sr:factor=2", "gaussian_blur:kernel_size=5,sigma=1.0"])
def test_beats_unguided_sampling_against_the_exact_posterior(spec):
    op = make_operator(spec, noise_std=NOISE_STD)
    generator = _gen(0)
    x_true = FLOW.sample_prior(32, generator)
    y = op.measure(x_true, generator)
    means = torch.stack([p.mean() for p in FLOW.posteriors(op, y, NOISE_STD)])
    objective = MeasurementFidelity(op, y)
    guided = dps(FLOW, objective, generator=_gen(1), progress=False).x
    unguided = get_method("unguided")(FLOW, objective, generator=_gen(1), batch_size=32, progress=False).x
    ratio, floor = mse_over_mmse(guided, x_true, means), mse_over_mmse(unguided, x_true, means)
    assert ratio < 0.5 * floor and ratio < 4.0, f"dps {ratio:.2f} vs unguided {floor:.2f}"


def test_a_general_objective_uses_its_loss_and_may_be_negative():
    target = FLOW.sample_prior(1, _gen(7))
    reward = CallableObjective(lambda x: -torch.exp(-(x - target).flatten(1).pow(2).sum(1)))
    out = dps(FLOW, reward, num_steps=10, batch_size=4, generator=_gen(), progress=False, step_size=1.0)
    assert torch.isfinite(out.x).all() and (out.info["residual"] < 0).all()
    with pytest.raises(ValueError, match="use_norm=False"):
        dps(FLOW, reward, num_steps=10, batch_size=4, generator=_gen(), progress=False, use_norm=True)


# -- bad input -----------------------------------------------------------------------------------------------

def _problem():
    op = make_operator("sr:factor=2", noise_std=NOISE_STD)
    x_true = FLOW.sample_prior(4, _gen(1))
    return MeasurementFidelity(op, op.measure(x_true, _gen(2)))


def test_negative_step_size_is_refused():
    with pytest.raises(ValueError, match="step_size must be a number >= 0"):
        dps(FLOW, _problem(), step_size=-0.1, progress=False)


def test_window_outside_the_schedule_is_refused():
    with pytest.raises(ValueError, match="outside the schedule of 10 steps"):
        dps(FLOW, _problem(), num_steps=10, window=(5, 12), progress=False)


def test_an_absurd_step_size_diverges_with_an_error_naming_the_step():
    with pytest.raises(DivergenceError, match=r"dps diverged: .* at step \d+; use a smaller step_size"):
        dps(FLOW, _problem(), num_steps=10, step_size=1e30, generator=_gen(), progress=False)
