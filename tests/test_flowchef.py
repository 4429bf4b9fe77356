"""FlowChef (gradient skipping) and its inversion-free editing, on an analytic mixture and tiny SD3 / Flux models."""

import pytest
import torch
from tiny_models import NEGATIVE, PROMPT, autograd_calls

from guidance import (AnalyticGMMFlow, CallableObjective, ClassifierObjective, DivergenceError, MeasurementFidelity,
                      RewardObjective, get_method, objective_gradient, sample, start_state)
from guidance.flow import euler_step
from guidance.methods.flowchef import PRESETS, flowchef
from guidance.methods.flowchef_edit import flowchef_edit
from operators import make_operator
from operators.base import operator_gain

EDIT_PROMPT = "a white cat in the city"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mixture() -> AnalyticGMMFlow:
    """Three well-separated Gaussian components on 1x4x4 images."""
    g = _gen(11)
    d = 16
    means = torch.stack([torch.full((d,), level) for level in (-0.6, 0.0, 0.6)]) + 0.1 * torch.randn(3, d, generator=g)
    factors = 0.15 * torch.randn(3, d, 4, generator=g, dtype=torch.float64)
    covariances = factors @ factors.transpose(-1, -2) + 0.02 * torch.eye(d, dtype=torch.float64)
    return AnalyticGMMFlow(torch.full((3,), 1 / 3), means, covariances, (1, 4, 4))


FLOW = _mixture()


def _noise(batch, seed):
    """A fixed starting point x_1 for the analytic flow (reusable, unlike a consumed generator)."""
    return torch.randn(batch, 1, 4, 4, generator=_gen(seed))


def _inpainting_problem(batch=16, noise_std=0.05):
    op = make_operator("inpaint_box:fraction=0.25", noise_std=noise_std)
    x_true = FLOW.sample_prior(batch, _gen(1))
    return op, x_true, op.measure(x_true, _gen(2))


def _text_case(request, kind):
    """(model, cond, image size) for a tiny text model."""
    model = request.getfixturevalue(kind)
    if kind == "sd3":
        return model, model.condition(PROMPT, NEGATIVE, 5.0), 32
    return model, model.condition(PROMPT, max_sequence_length=32), 32


def _image(size, seed=5):
    return torch.rand(1, 3, size, size, generator=_gen(seed)) * 2 - 1


def _fidelity(space, size):
    op = make_operator("inpaint_box:fraction=0.25")
    return MeasurementFidelity(op, op(_image(size)), space=space)


# -- gradient skipping: the unguided limit, no network gradient ------------------------------------------------

def test_step_size_zero_is_unguided_sampling_bit_for_bit_on_sd3(sd3):
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    common = dict(num_steps=3, height=32, width=32, progress=False)
    ref = sample(sd3, cond, generator=_gen(), **common)
    out = flowchef(sd3, _fidelity("latent", 32), cond=cond, generator=_gen(), step_size=0.0, inner_steps=2, **common)
    assert torch.equal(out.x, ref.x) and torch.equal(out.image, ref.image)
    assert out.nfe == 3 and out.info["loss"].shape == (3, 2, 1)


def test_step_size_zero_is_unguided_sampling_bit_for_bit_on_the_analytic_flow():
    op, _, y = _inpainting_problem()
    ref = sample(FLOW, num_steps=20, generator=_gen(), batch_size=16, progress=False)
    for optimizer in ("gd", "sgd", "adam"):
        out = flowchef(FLOW, MeasurementFidelity(op, y), num_steps=20, generator=_gen(), batch_size=16,
                       progress=False, step_size=0.0, optimizer=optimizer)
        assert torch.equal(out.x, ref.x), optimizer


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_transformer_is_never_differentiated_and_no_parameter_gets_a_gradient(kind, request):
    model, cond, size = _text_case(request, kind)

    # pixel loss: the VAE decoder is differentiated, with respect to the latent only
    with autograd_calls(model.transformer) as calls:
        out = flowchef(model, _fidelity("pixel", size), cond=cond, num_steps=2, height=size, width=size,
                       generator=_gen(), progress=False, inner_steps=2)
    assert calls and all(not grad_on and not requires for grad_on, requires, _ in calls)
    assert not out.x.requires_grad and out.info["loss"].shape == (2, 2, 1)
    modules = [m for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    assert all(p.grad is None for m in modules for p in m.parameters())


# -- end to end on the tiny text models ----------------------------------------------------------------------

@pytest.mark.parametrize("space", ["latent", "pixel"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_runs_end_to_end_and_is_deterministic_under_a_seed(kind, space, request):
    model, cond, size = _text_case(request, kind)
    objective = _fidelity(space, size)
    run = get_method("flowchef", step_size=0.5, inner_steps=2)
    steps = []

    def go(seed, callback=None):
        return run(model, objective, cond=cond, num_steps=3, height=size, width=size, generator=_gen(seed),
                   progress=False, callback=callback)

    a = go(0, callback=steps.append)
    b, c = go(0), go(1)
    assert a.image.shape == (1, 3, size, size) and torch.isfinite(a.image).all()
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.nfe == 3
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert {"step", "sigma", "x", "x0_hat", "loss"} <= set(steps[0])
    loss = a.info["loss"][:, :, 0]
    assert loss[0, 1] < loss[0, 0], "the inner update must lower the objective of the clean estimate"


# -- the update does what it says, on the exact flow of a Gaussian mixture --------------------------------------

def test_guidance_lowers_the_data_term_and_a_wrong_signed_update_raises_it():
    op, _, y = _inpainting_problem()
    fidelity = MeasurementFidelity(op, y)
    common = dict(num_steps=20, latents=_noise(16, 3), progress=False)
    unguided = fidelity(FLOW, sample(FLOW, **common).x).mean()
    guided = fidelity(FLOW, flowchef(FLOW, fidelity, **common).x).mean()
    ascent = CallableObjective(lambda x: -fidelity.loss(x))
    # ascent on a quadratic grows without bound: past the divergence bound (100× the noise's RMS) by step 13
    wrong = fidelity(FLOW, flowchef(FLOW, ascent, check_divergence=False, **common).x).mean()
    assert guided < 0.1 * unguided
    assert wrong > unguided


def test_classifier_guidance_raises_the_target_class_probability():
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    label = 2
    common = dict(num_steps=20, latents=_noise(32, 4), progress=False)

    def p_label(x):
        return torch.softmax(classifier(x), dim=1)[:, label].mean()

    with torch.no_grad():
        unguided = p_label(sample(FLOW, **common).x)
    guided = flowchef(FLOW, ClassifierObjective(classifier, label), step_size=1.0, **common)
    with torch.no_grad():
        assert p_label(guided.x) > unguided + 0.1
    assert all(p.grad is None for p in classifier.parameters())


def test_reward_guidance_raises_the_reward():
    def brightness(x):
        return x.flatten(1).mean(1)

    common = dict(num_steps=20, latents=_noise(32, 4), progress=False)
    unguided = brightness(sample(FLOW, **common).x).mean()
    guided = brightness(flowchef(FLOW, RewardObjective(brightness), **common).x).mean()
    assert guided > unguided + 0.1


# -- optimizers ----------------------------------------------------------------------------------------------

def _first_updates(optimizer, step_size, num_steps=2, **options):
    """Run with every step guided; return [(x before guidance, gradient, x after guidance)] per step."""
    op, _, y = _inpainting_problem(batch=4)
    objective = MeasurementFidelity(op, y)
    seen = []
    out = flowchef(FLOW, objective, num_steps=num_steps, generator=_gen(6), batch_size=4, progress=False,
                   optimizer=optimizer, step_size=step_size, callback=seen.append, **options)
    sigmas = out.sigmas
    x = start_state(FLOW, None, num_steps, generator=_gen(6), batch_size=4).x
    records = []
    for i, record in enumerate(seen):
        v = FLOW.velocity(x, sigmas[i])
        grad = objective_gradient(objective, FLOW, x - sigmas[i] * v)[1]
        records.append((x, grad, record["x"]))
        x = euler_step(record["x"], v, sigmas[i], sigmas[i + 1])
    return records


def test_gd_is_x_minus_lr_times_the_gradient():
    for x, grad, after in _first_updates("gd", 0.3):
        assert torch.equal(after, x - 0.3 * grad)


def test_sgd_without_momentum_is_gd():
    for x, grad, after in _first_updates("sgd", 0.3):
        torch.testing.assert_close(after, x - 0.3 * grad, rtol=0, atol=1e-6)


def test_adam_is_recreated_every_step_so_each_first_update_is_sign_like():
    records = _first_updates("adam", 0.02, num_steps=3)
    for x, grad, after in records:  # the same at every step: the optimizer state never carries over
        torch.testing.assert_close(after, x - 0.02 * grad / (grad.abs() + 1e-8), rtol=1e-5, atol=1e-7)


def test_sgd_momentum_accumulates_within_one_step_only():
    op, _, y = _inpainting_problem(batch=2)
    objective = MeasurementFidelity(op, y)
    common = dict(num_steps=4, latents=_noise(2, 7), progress=False, step_size=0.2, inner_steps=3)
    plain = flowchef(FLOW, objective, optimizer="sgd", **common).x
    heavy = flowchef(FLOW, objective, optimizer="sgd", momentum=0.9, **common).x
    single = dict(common, inner_steps=1)
    assert not torch.equal(plain, heavy)
    torch.testing.assert_close(flowchef(FLOW, objective, optimizer="sgd", momentum=0.9, **single).x,
                               flowchef(FLOW, objective, optimizer="gd", **single).x, rtol=0, atol=1e-6)


# -- bad input -----------------------------------------------------------------------------------------------

def _analytic_run(objective=None, **options):
    op, _, y = _inpainting_problem(batch=2)
    objective = objective or MeasurementFidelity(op, y)
    return flowchef(FLOW, objective, num_steps=5, generator=_gen(), batch_size=2, progress=False, **options)


def test_a_normalised_step_is_the_step_divided_by_the_operator_gain():
    op = make_operator("sr:factor=2", noise_std=0.05)
    y = op.measure(FLOW.sample_prior(8, _gen(1)), _gen(2))
    gain = operator_gain(op, (1, 1, 4, 4))
    assert 0.2 < gain < 0.3  # about 1/f²
    common = dict(num_steps=10, latents=_noise(8, 3), progress=False, window=(0, 5))
    normalised = flowchef(FLOW, MeasurementFidelity(op, y), step_size=0.1, normalize_step=True, **common)
    scaled = flowchef(FLOW, MeasurementFidelity(op, y), step_size=0.1 / gain, **common)
    plain = flowchef(FLOW, MeasurementFidelity(op, y), step_size=0.1, **common)
    torch.testing.assert_close(normalised.x, scaled.x)
    assert not torch.allclose(normalised.x, plain.x)


def test_stop_sigma_guides_the_steps_above_that_noise_level_as_a_window_would():
    op, _, y = _inpainting_problem(batch=4)
    sigmas = FLOW.sigmas(10)
    above = [i for i in range(10) if float(sigmas[i]) > 0.55]
    assert 0 < len(above) < 10
    common = dict(num_steps=10, latents=_noise(4, 3), progress=False, step_size=0.3)
    by_sigma = flowchef(FLOW, MeasurementFidelity(op, y), stop_sigma=0.55, **common)
    by_window = flowchef(FLOW, MeasurementFidelity(op, y), window=(0, len(above)), **common)
    assert by_sigma.info["guided_steps"] == above
    torch.testing.assert_close(by_sigma.x, by_window.x)
    with pytest.raises(ValueError, match="stop_sigma must be a number >= 0"):
        _analytic_run(stop_sigma=-0.5)


def test_normalize_step_is_refused_with_adam_and_must_be_a_bool():
    with pytest.raises(ValueError, match="Adam's step already ignores the scale"):
        _analytic_run(optimizer="adam", normalize_step=True)
    with pytest.raises(ValueError, match="normalize_step must be True or False"):
        _analytic_run(normalize_step=1)


def test_negative_step_size_is_refused():
    with pytest.raises(ValueError, match="step_size must be a number >= 0"):
        _analytic_run(step_size=-0.1)


def test_negative_or_zero_inner_steps_are_refused():
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1"):
        _analytic_run(inner_steps=-1)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1, got 0; inner_steps=0 guides no step: "
                                         "for sampling without guidance use the method 'unguided'"):
        _analytic_run(inner_steps=0)


def test_a_window_outside_the_schedule_is_refused():
    with pytest.raises(ValueError, match="outside the schedule of 5 steps"):
        _analytic_run(window=(2, 9))


def test_unknown_optimizer_and_misplaced_momentum_are_refused():
    with pytest.raises(ValueError, match="did you mean 'adam'"):
        _analytic_run(optimizer="adm")
    with pytest.raises(ValueError, match="applies to optimizer='sgd' only"):
        _analytic_run(optimizer="adam", momentum=0.9)


def test_divergence_names_the_step_and_suggests_a_smaller_step_size():
    with pytest.raises(DivergenceError, match=r"flowchef diverged: .* at step \d+; use a smaller step_size"):
        _analytic_run(step_size=1e30, inner_steps=3)


def test_a_classifier_label_out_of_range_is_refused():
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with pytest.raises(ValueError, match="label 5 is out of range for a classifier with 3 classes"):
        _analytic_run(ClassifierObjective(classifier, 5))


def test_one_restoration_per_measurement_by_default():
    op, _, y = _inpainting_problem(batch=3)
    out = flowchef(FLOW, MeasurementFidelity(op, y), num_steps=2, generator=_gen(), progress=False, decode=False)
    assert out.x.shape == (3, 1, 4, 4) and out.image is None


def test_an_objective_is_required():
    with pytest.raises(ValueError, match="flowchef needs an Objective"):
        flowchef(FLOW, None, num_steps=2, progress=False)


# -- inversion-free editing ----------------------------------------------------------------------------------

def _edit_case(request, kind):
    model = request.getfixturevalue(kind)
    size = 32
    mask = torch.zeros(size, size)
    mask[:, : size // 2] = 1  # edit the left half, keep the right half
    latent_elements = 4 * (size // 8) ** 2
    # the pull contracts the gap by 2 * lr * 1000 / n per inner update: a third of it here (0.5 % at 1024² Flux)
    step_size = 0.33 * latent_elements / 2000
    return model, size, mask, step_size


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_editing_keeps_the_unmasked_region_and_is_deterministic(kind, request):
    model, size, mask, step_size = _edit_case(request, kind)
    source = _image(size)
    texts = {"max_sequence_length": 32} if kind == "flux" else {"guidance_scale": 1.0}  # short T5 input: fast
    src_cond, edit_cond = model.condition(PROMPT, **texts), model.condition(EDIT_PROMPT, **texts)
    run = get_method("flowchef_edit", source_image=source, mask=mask, source_prompt=src_cond, edit_prompt=edit_cond,
                     step_size=step_size, source_steps=3)
    a, b, c = (run(model, num_steps=6, generator=_gen(seed), progress=False) for seed in (0, 0, 1))
    assert a.image.shape == source.shape and torch.isfinite(a.image).all()
    assert a.nfe == 12  # the source and edit prompts, one evaluation each per step
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)

    keep = 1 - a.info["edit_mask"]
    assert keep.shape == (1, 1, size // 8, size // 8) and keep.sum() > 0
    z_src = model.encode(source)
    unguided = sample(model, edit_cond, num_steps=6, height=size, width=size, generator=_gen(0), progress=False).x
    kept_gap = (keep * (a.x - z_src)).norm()
    assert kept_gap < 0.2 * (keep * (unguided - z_src)).norm()


def test_editing_refuses_a_mask_of_the_wrong_size(sd3):
    with pytest.raises(ValueError, match="the mask is 16x16 but the source image is 32x32"):
        flowchef_edit(sd3, source_image=_image(32), mask=torch.ones(16, 16), source_prompt=PROMPT,
                      edit_prompt=EDIT_PROMPT, num_steps=2, progress=False)


def test_editing_refuses_a_step_size_that_makes_the_source_pull_diverge(sd3):
    # a 32x32 image has n = 64 latent elements: 2 * 0.6 * 1000 / 64 = 18.75 >= 2
    with pytest.raises(ValueError, match="step_size=0.6 is too large for a 32x32 image.*use step_size < 0.064"):
        flowchef_edit(sd3, source_image=_image(32), mask=torch.ones(32, 32), source_prompt=PROMPT,
                      edit_prompt=EDIT_PROMPT, num_steps=2, progress=False)


def test_editing_refuses_missing_inputs_and_untexted_models(sd3):
    with pytest.raises(ValueError, match="needs source_prompt"):
        flowchef_edit(sd3, source_image=_image(32), mask=torch.ones(32, 32), edit_prompt=EDIT_PROMPT, progress=False)
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        flowchef_edit(FLOW, source_image=torch.zeros(1, 1, 4, 4), mask=torch.ones(4, 4), source_prompt="a",
                      edit_prompt="b", num_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        flowchef_edit(sd3, source_image=_image(32), mask=2 * torch.ones(32, 32), source_prompt=PROMPT,
                      edit_prompt=EDIT_PROMPT, progress=False)


# -- presets -------------------------------------------------------------------------------------------------

def test_presets_are_valid_method_settings():
    assert {"flowchef_pixel_rf", "flowchef_sd15_pixel", "flowchef_sd15_latent_inpaint",
            "flowchef_flux_latent_inpaint", "flowchef_flux_edit"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert {"method", "num_steps", "options", "objective", "operators", "source"} <= set(preset), name
        get_method(preset["method"], **preset["options"])  # unknown options would raise
        for spec in preset["operators"] or []:
            make_operator(spec)
        if preset["objective"] is not None:
            assert set(preset["objective"]) <= {"space", "weight", "reduction"}
