"""FLAIR: the algorithm's pieces, hard data consistency, no network gradients, real adapters, bad input."""

import math
import warnings

import pytest
import torch
from tiny_models import PROMPT, flux_pipeline, sd3_pipeline

from guidance import AnalyticGMMFlow, CallableObjective, DivergenceError, MeasurementFidelity, get_method
from guidance.features.calibration import CRWTable
from guidance.methods import method_options
from guidance.methods.flair import (PRESETS, data_consistency, default_data_lr, dta_noise, flair, flair_grid,
                                    initial_image, operator_gain, regularizer_step, sr_data_lr)
from guidance.backbones.flux import FluxModel
from guidance.backbones.sd3 import SD3Model
from operators import make_operator
from operators.composition import Composition
from operators.gaussian_blur import GaussianBlur
from operators.super_resolution import AveragePoolDownsampling

NOISE = 0.05


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Automatic CRW lookup must not see the user's cache."""
    monkeypatch.setenv("FLOWSTEER_CACHE", str(tmp_path / "cache"))


def smooth_prior(shape=(1, 8, 8), components=3, seed=0) -> AnalyticGMMFlow:
    """A small mixture of smooth-image Gaussians (squared-exponential covariances, nearly degenerate)."""
    g = _gen(seed)
    c, h, w = shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], 1).repeat(c, 1)
    d2 = ((points[:, None] - points[None]) ** 2).sum(-1)
    means, covs = [], []
    for _ in range(components):
        u = torch.rand(3, generator=g, dtype=torch.float64)
        means.append(torch.full((c * h * w,), float(1.2 * u[0] - 0.6), dtype=torch.float64))
        covs.append((0.15 + 0.2 * u[1]) ** 2 * torch.exp(-d2 / (2 * (1 + 2 * u[2]) ** 2))
                    + 1e-4 * torch.eye(c * h * w, dtype=torch.float64))
    return AnalyticGMMFlow(torch.full((components,), 1 / components), torch.stack(means), torch.stack(covs), shape)


FLOW = smooth_prior()


def problem(spec, n=8, seed=0, flow=FLOW, noise=NOISE):
    op = make_operator(spec, noise_std=noise)
    g = _gen(seed)
    x = flow.sample_prior(n, g)
    return op, x, op.measure(x, g)


def quiet_flair(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return flair(*args, **kwargs)


# -- the algorithm's pieces -------------------------------------------------------------------------------------
def test_grid_is_uniform_without_endpoints():
    grid = flair_grid(50, 0.18)
    assert grid.shape == (50,) and grid.dtype == torch.float64
    step = (1 - 0.18) / 51
    torch.testing.assert_close(grid, 1 - step * torch.arange(1, 51, dtype=torch.float64))
    assert grid.max() < 1 and grid.min() > 0.18


def test_regularizer_step_is_relaxation_toward_the_clean_estimate():
    g = _gen(1)
    mu, eps, v = (torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for s, w in [(0.9, 0.3), (0.5, 0.73), (0.2, 0.3)]:
        x_s = s * eps + (1 - s) * mu
        x0_hat = x_s - s * v
        torch.testing.assert_close(regularizer_step(mu, v, eps, w), mu + (w / s) * (x0_hat - mu),
                                   rtol=0, atol=1e-12)


def test_dta_mixes_the_noise_estimate_with_weight_one_minus_s():
    g = _gen(2)
    eps_hat, z = torch.randn(2, 100_000, generator=g, dtype=torch.float64)
    for s in (0.9, 0.5, 0.2):
        a = 1 - s
        torch.testing.assert_close(dta_noise(eps_hat, z, s), a * eps_hat + math.sqrt(1 - a * a) * z)
        assert abs(dta_noise(eps_hat, z, s).var().item() - 1) < 0.02  # a unit-variance mix
    assert torch.equal(dta_noise(eps_hat, z, 0.3, dta=False), z)  # a = 0: fresh noise only
    assert torch.equal(dta_noise(eps_hat, z, 1.0), z)


def test_initial_image_rules():
    x = torch.rand(2, 3, 16, 16, generator=_gen(3)) * 2 - 1
    sr = make_operator("sr:factor=2")  # cheap pseudo-inverse
    torch.testing.assert_close(sr(initial_image(sr, sr(x))), sr(x), atol=1e-4, rtol=0)
    box = make_operator("inpaint_box:fraction=0.25")  # zero fill
    torch.testing.assert_close(initial_image(box, box(x)), box(x))
    blur = make_operator("gaussian_blur:kernel_size=5,sigma=1.0")  # no pseudo-inverse, same shape: y itself
    assert not blur.has_pseudo_inverse
    torch.testing.assert_close(initial_image(blur, blur(x)), blur(x))
    both = Composition([GaussianBlur(kernel_size=3, sigma=1.0, padding="circular"), AveragePoolDownsampling(2)])
    assert not both.has_pseudo_inverse  # the scaled adjoint: a constant image keeps its level
    flat = torch.full((1, 3, 16, 16), 0.4)
    torch.testing.assert_close(initial_image(both, both(flat)), flat, atol=1e-5, rtol=0)


def test_operator_gain_and_default_learning_rates():
    shape = (1, 1, 8, 8)
    assert abs(operator_gain(make_operator("inpaint_box:fraction=0.25"), shape) - 1) < 1e-6
    assert abs(operator_gain(make_operator("sr_avgpool:factor=2"), shape) - 0.25) < 1e-6
    assert abs(operator_gain(GaussianBlur(kernel_size=5, sigma=1.0, padding="circular"), shape) - 1) < 1e-5
    assert 1 <= operator_gain(make_operator("gaussian_blur:kernel_size=5,sigma=1.0"), shape) < 1.1  # reflect edges
    box = make_operator("inpaint_box:fraction=0.25")
    assert default_data_lr(box, shape, pixel_space=False, max_weight=0.73) == pytest.approx(0.1)  # the paper's
    assert default_data_lr(make_operator("sr_avgpool:factor=4"), (1, 1, 16, 16), False, 0.73) == pytest.approx(1.6)
    assert default_data_lr(box, shape, pixel_space=True, max_weight=0.45) == pytest.approx(0.9 / 0.45)
    assert sr_data_lr(12) == 12 and sr_data_lr(4) == pytest.approx(4 / 3)


# -- hard data consistency --------------------------------------------------------------------------------------
def test_data_loop_does_nothing_when_the_measurement_is_already_fitted():
    op, x, _ = problem("inpaint_box:fraction=0.25", n=4)
    y = op(x)  # exactly consistent
    objective = MeasurementFidelity(op, y, noise_std=NOISE)
    mu, steps, loss = data_consistency(FLOW, objective, x, y, 0.5, 15, NOISE**2 * y[0].numel())
    assert steps.tolist() == [0, 0, 0, 0]
    assert torch.equal(mu, x) and (loss == 0).all()


def test_data_loop_stops_at_the_noise_level_per_sample():
    op, x, y = problem("inpaint_box:fraction=0.25", n=2)
    objective = MeasurementFidelity(op, y)
    threshold = NOISE**2 * y[0].numel()
    start = x.clone()
    start[1] = 0.0  # far from its measurement; sample 0 starts on the truth (L about the noise level or less)
    start[0] = op.pseudo_inverse(y[:1])[0] + (1 - op.mask_for(x[:1])[0]) * x[0]  # fits y exactly: L = 0
    mu, steps, loss = data_consistency(FLOW, objective, start, y, 0.1, 50, threshold)
    assert steps[0] == 0 and torch.equal(mu[0], start[0])
    assert 0 < steps[1] < 50  # ran, and stopped early
    assert loss[1] < threshold  # it stopped because the discrepancy principle held ...
    before = (op(start[1:]) - y[1:]).square().sum()
    assert before >= threshold
    # ... and not earlier: one step less leaves L above the threshold
    _, _, last = data_consistency(FLOW, objective, start[1:], y[1:], 0.1, int(steps[1]) - 1, threshold)
    assert last[0] >= threshold
    # with too few iterations it runs them all
    _, few, _ = data_consistency(FLOW, objective, start[1:], y[1:], 0.1, 2, threshold)
    assert few.tolist() == [2]


def test_flair_reports_data_steps_and_fits_the_noise_level():
    op, x, y = problem("inpaint_box:fraction=0.25", n=16)
    out = quiet_flair(FLOW, MeasurementFidelity(op, y), num_steps=20, generator=_gen(1), progress=False)
    info = out.info
    assert info["data_steps"].shape == (20, 16) and info["data_loss"].shape == (20, 16)
    assert (info["data_steps"] <= 15).all() and (info["data_steps"] > 0).any()
    # σ² times the measured entries: the box's 25 % of pixels are holes, not measured (y.numel() would count them)
    assert info["threshold"] == pytest.approx(NOISE**2 * 0.75 * y[0].numel())
    stopped = info["data_steps"] < 15
    assert (info["data_loss"][stopped] < info["threshold"]).all()
    residual = (op(out.x) - y).square().flatten(1).sum(1).mean()
    assert residual < 2 * info["threshold"]
    assert out.nfe == 20 and out.sigmas.shape == (20,) and len(info["weights"]) == 20


def test_flair_beats_the_pseudo_inverse_on_an_analytic_prior():
    op, x, y = problem("inpaint_box:fraction=0.25", n=48, seed=5)
    means = torch.stack([p.mean() for p in FLOW.posteriors(op, y, NOISE)]).float()
    mmse = (means - x).square().sum((1, 2, 3)).mean()
    out = quiet_flair(FLOW, MeasurementFidelity(op, y), num_steps=50, generator=_gen(6), progress=False).x
    pinv = op.pseudo_inverse(y)
    ratio = float((out - x).square().sum((1, 2, 3)).mean() / mmse)
    assert ratio < 4.0
    assert ratio < 0.5 * float((pinv - x).square().sum((1, 2, 3)).mean() / mmse)


def test_shared_measurement_and_callback():
    op, x, y = problem("sr:factor=2", n=1)
    seen = []
    out = quiet_flair(FLOW, MeasurementFidelity(op, y), num_steps=5, batch_size=3, generator=_gen(1),
                      progress=False, callback=seen.append)
    assert out.x.shape == (3, 1, 8, 8)
    assert not torch.allclose(out.x[0], out.x[1])  # different noise per restoration
    assert [d["step"] for d in seen] == list(range(5))
    assert set(seen[0]) >= {"step", "sigma", "x", "x_s", "x0_hat", "weight", "data_steps"}
    assert seen[-1]["x"] is out.x


# -- options ----------------------------------------------------------------------------------------------------
def test_crw_option_forms(tmp_path):
    op, x, y = problem("sr:factor=2", n=2)
    objective = MeasurementFidelity(op, y)
    common = dict(num_steps=4, generator=_gen(1), progress=False)
    out = flair(FLOW, objective, crw=0.25, **common)
    assert out.info["weights"] == [0.25] * 4 and out.info["crw_origin"] == "constant"
    table = CRWTable.constant(0.3)
    assert flair(FLOW, objective, crw=table, **common).info["crw"] is table
    path = table.save(tmp_path / "t.json")
    assert flair(FLOW, objective, crw=str(path), **common).info["weights"] == [0.3] * 4
    with pytest.warns(UserWarning, match="[Cc]alibration is advised"):
        out = flair(FLOW, objective, **common)
    assert out.info["crw_origin"] == "default"
    with pytest.raises(ValueError, match="crw must be"):
        flair(FLOW, objective, crw=[0.5], **common)
    with pytest.raises(FileNotFoundError, match="calibrate"):
        flair(FLOW, objective, crw=str(tmp_path / "missing.json"), **common)


def test_dta_off_and_registry():
    op, x, y = problem("gaussian_blur:kernel_size=5,sigma=1.0", n=2)
    run = get_method("flair", data_steps=3, crw=0.4, dta=False)
    out = run(FLOW, MeasurementFidelity(op, y), num_steps=4, generator=_gen(1), progress=False)
    assert torch.isfinite(out.x).all()
    assert {"sigma_min", "data_steps", "data_lr", "crw", "dta", "check_divergence"} <= set(method_options("flair"))


def test_presets_are_valid_settings():
    assert {"flair_sr12", "flair_inpaint", "flair_motion_deblur"} <= set(PRESETS)
    assert PRESETS["flair_sr12"]["options"]["data_lr"] == 12
    assert PRESETS["flair_inpaint"]["options"]["data_lr"] == 0.1
    assert PRESETS["flair_motion_deblur"]["options"]["data_lr"] == 0.1
    options = method_options("flair")
    for name, preset in PRESETS.items():
        assert preset["method"] == "flair" and preset["num_steps"] == 50
        assert set(preset["options"]) <= set(options), name
        assert preset["objective"] == {"space": "pixel", "reduction": "sum"}
        assert preset["guidance_scale"] == 2.0 and preset["noise_std"] == 0.01 and preset["resolution"] == 768
        for spec in preset["operators"]:
            make_operator(spec)
        get_method("flair", **preset["options"])


# -- no network gradients; real adapters ------------------------------------------------------------------------
def test_transformer_never_records_a_graph_and_no_parameter_gets_a_grad():
    model = SD3Model(sd3_pipeline())
    calls = {"transformer": 0, "decoder_with_grad": 0}

    def transformer_hook(module, args, output):
        assert not torch.is_grad_enabled()
        calls["transformer"] += 1

    def decoder_hook(module, args, output):
        calls["decoder_with_grad"] += int(torch.is_grad_enabled())

    handles = [model.transformer.register_forward_hook(transformer_hook),
               model.pipeline.vae.decoder.register_forward_hook(decoder_hook)]
    try:
        op = make_operator("sr:factor=2", noise_std=0.01)
        x = torch.rand(1, 3, 32, 32, generator=_gen(0)) * 2 - 1
        y = op.measure(x, _gen(1))
        out = flair(model, MeasurementFidelity(op, y), num_steps=3, cond=model.condition(PROMPT, "", 2.0),
                    generator=_gen(2), progress=False, crw=0.5, data_steps=2)
    finally:
        for h in handles:
            h.remove()
    assert calls["transformer"] == 3 and out.nfe == 3
    assert calls["decoder_with_grad"] > 0  # the data term differentiates through the decoder
    for module in (model.transformer, model.pipeline.vae):
        assert all(p.grad is None for p in module.parameters())
    assert not out.x.requires_grad and not out.image.requires_grad


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_end_to_end_on_tiny_backbones_is_deterministic(kind):
    if kind == "sd3":
        model, size = SD3Model(sd3_pipeline()), 32
        cond = model.condition(PROMPT, "", 2.0)
    else:
        model, size = FluxModel(flux_pipeline(dev=True)), 64
        cond = model.condition(PROMPT, max_sequence_length=48)
    op = make_operator("inpaint_box:fraction=0.25", noise_std=0.01)
    x = torch.rand(2, 3, size, size, generator=_gen(0)) * 2 - 1
    objective = MeasurementFidelity(op, op.measure(x, _gen(1)))
    run = dict(num_steps=3, cond=cond, progress=False, crw=0.5, data_steps=2)
    a = flair(model, objective, generator=_gen(7), **run)
    b = flair(model, objective, generator=_gen(7), **run)
    c = flair(model, objective, generator=_gen(8), **run)
    assert a.image.shape == (2, 3, size, size) and a.x.shape == (2, *model.latent_shape(size, size))
    assert torch.isfinite(a.image).all() and a.nfe == 3
    assert torch.equal(a.x, b.x) and torch.equal(a.image, b.image)
    assert not torch.equal(a.x, c.x)
    assert flair(model, objective, generator=_gen(7), decode=False, **run).image is None


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.fixture
def sr_objective():
    op, x, y = problem("sr:factor=2", n=2)
    return MeasurementFidelity(op, y)


def test_needs_a_measurement_fidelity(sr_objective):
    other = CallableObjective(lambda img: img.square().flatten(1).sum(1))
    with pytest.raises(ValueError, match="MeasurementFidelity"):
        flair(FLOW, other, num_steps=2, progress=False)


def test_measurement_shape_mismatch(sr_objective):
    op = make_operator("sr:factor=2", noise_std=NOISE)
    wrong = MeasurementFidelity(op, torch.zeros(2, 1, 3, 3))  # an 8x8 image gives 4x4 measurements
    with pytest.raises(ValueError, match="measurement has shape"):
        flair(FLOW, wrong, num_steps=2, height=8, width=8, progress=False, crw=0.5)


@pytest.mark.parametrize("options, message", [
    (dict(data_lr=-0.1), "data_lr"),
    (dict(data_steps=-1), "data_steps"),
    (dict(data_steps=2.5), "data_steps"),
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_min=1.0), "sigma_min"),
    (dict(sigma_min=-0.2), "sigma_min"),
    (dict(num_steps=0), "num_steps"),
    (dict(dta="yes"), "dta"),
])
def test_bad_options(sr_objective, options, message):
    kwargs = dict(num_steps=2, progress=False, crw=0.5)
    kwargs.update(options)
    with pytest.raises(ValueError, match=message):
        flair(FLOW, sr_objective, **kwargs)


def test_latent_space_objective_is_refused(sr_objective):
    latent = MeasurementFidelity(sr_objective.operator, sr_objective.y, space="latent")
    with pytest.raises(ValueError, match="space='pixel'"):
        flair(FLOW, latent, num_steps=2, progress=False, crw=0.5)


def test_divergence_names_the_step(sr_objective):
    with pytest.raises(DivergenceError, match="step 0"):
        flair(FLOW, sr_objective, num_steps=3, data_lr=1e30, crw=0.5, generator=_gen(1), progress=False)


def test_the_relative_stop_ends_noiseless_data_steps_early_and_is_off_by_default():
    op, x, y = problem("sr:factor=2", n=4, noise=0.0)
    objective = MeasurementFidelity(op, y)
    start = op.pseudo_inverse(y)
    # noiseless: the discrepancy threshold is 0, so the paper's rule runs every step
    _, paper, _ = data_consistency(FLOW, objective, start, y, 0.1, 30, 0.0)
    assert paper.tolist() == [30] * 4
    _, relative, loss = data_consistency(FLOW, objective, start, y, 0.1, 30, 0.0, stop_rtol=0.05)
    assert (relative < 30).all() and (relative >= 1).all()
    out = quiet_flair(FLOW, objective, num_steps=6, generator=_gen(1), progress=False, data_stop_rtol=0.5)
    default = quiet_flair(FLOW, objective, num_steps=6, generator=_gen(1), progress=False)
    assert out.info["data_steps"].sum() < default.info["data_steps"].sum() == 6 * 4 * 15
    with pytest.raises(ValueError, match=r"data_stop_rtol must be a share in \[0, 1\)"):
        quiet_flair(FLOW, objective, num_steps=2, data_stop_rtol=1.5)
    with pytest.raises(ValueError, match="data_steps=0 runs none"):
        quiet_flair(FLOW, objective, num_steps=2, data_steps=0, data_stop_rtol=0.1)
