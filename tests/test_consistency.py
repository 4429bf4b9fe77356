"""Pixel-space data consistency (projected Landweber, discrepancy stop) and the restore settings built on it:
posterior-mean restoration from several samples, the model's recommended consistency steps."""

import pytest
import torch

from guidance.features.consistency import pixel_consistency
from operators import make_operator
from tasks.commands.restore import restore


def smooth_image(seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=g) - 0.5
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def test_updates_stay_in_the_row_space_and_reduce_the_residual():
    op = make_operator("sr:factor=4")
    x_true, guess = smooth_image(0), smooth_image(1) * 0.5
    y = op(x_true)
    out, steps = pixel_consistency(guess, op, y, noise_std=0.0, max_steps=30, return_steps=True)
    assert 20 <= int(steps[0]) <= 30  # noiseless: it runs until the residual stagnates (or 30)
    assert (op(out) - y).norm() < 0.05 * (op(guess) - y).norm()
    # Landweber moves x along range(Aᵀ) only: the null-space part of the guess is kept
    z = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    null = z - op.A_dagger_cg(op(z))
    assert abs(float(((out - guess) * null).sum())) < 1e-3 * float((out - guess).norm() * null.norm())


def test_inpainting_takes_the_measured_pixels_in_one_step():
    op = make_operator("inpaint_box:fraction=0.25")
    x_true, guess = smooth_image(3), smooth_image(4)
    y = op(x_true)
    out, steps = pixel_consistency(guess, op, y, noise_std=0.0, max_steps=1, return_steps=True)
    mask = op(torch.ones_like(guess))
    assert torch.allclose(out * mask, y, atol=1e-6)
    assert torch.equal(out * (1 - mask), guess * (1 - mask))  # the hole is the prior's


def test_stops_at_the_noise_level_per_image():
    op = make_operator("gaussian_blur:sigma=2", noise_std=0.01)
    x_true = smooth_image(5)
    y = op.measure(x_true, torch.Generator().manual_seed(0))
    guesses = torch.cat([smooth_image(6), x_true])  # far from y; within twice the noise std of it
    out, steps = pixel_consistency(guesses, op, y, noise_std=0.02, max_steps=200, return_steps=True)
    threshold = 0.02**2 * y[0].numel()
    residual = (op(out) - y).square().flatten(1).sum(1)
    assert int(steps[1]) == 0 and torch.equal(out[1], guesses[1])
    assert 0 < int(steps[0]) < 200 and float(residual[0]) <= threshold
    before = pixel_consistency(guesses[:1], op, y, noise_std=0.02, max_steps=int(steps[0]) - 1)
    assert float((op(before) - y).square().sum()) > threshold  # the first iterate below the level, not a later one


def test_bad_input_is_named():
    op = make_operator("sr:factor=4")
    x = smooth_image(0)
    with pytest.raises(ValueError, match="linear operator"):
        pixel_consistency(x, make_operator("jpeg:quality=50"), x)
    with pytest.raises(ValueError, match="measurement has shape"):
        pixel_consistency(x, op, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        pixel_consistency(x, op, op(x) * float("nan"))
    with pytest.raises(ValueError, match="integer >= 0"):
        pixel_consistency(x, op, op(x), max_steps=-1)


@pytest.fixture(scope="module")
def default_model():
    from guidance import load_model

    return load_model("default")


def test_samples_average_the_batched_seeds(default_model):
    op = make_operator("sr:factor=4", noise_std=0.01)
    y = op.measure(smooth_image(7, 64), torch.Generator().manual_seed(0))
    run = dict(num_steps=4, options={"step_size": 0.5}, progress=False, consistency_steps=0)
    mean = restore(default_model, y, op, "flowchef", seed=3, samples=3, **run)
    singles = torch.cat([restore(default_model, y, op, "flowchef", seed=3 + k, **run).restored for k in range(3)])
    assert torch.allclose(mean.samples, singles, atol=1e-4)  # sample k of the batch: seed + 1 + k
    assert torch.allclose(mean.restored, singles.mean(0, keepdim=True), atol=1e-4)
    assert mean.metrics["sample_std"] == pytest.approx(float(singles.std(0).mean()), abs=1e-4)
    assert mean.settings["samples"] == 3 and mean.metrics["samples"] == 3
    assert float(singles.std(0).mean()) > 1e-3  # the seeds differ: the mean is not one of them


def test_consistency_steps_follow_the_model_unless_set(default_model, monkeypatch):
    op = make_operator("gaussian_blur:sigma=2", noise_std=0.01)
    y = op.measure(smooth_image(8, 64), torch.Generator().manual_seed(0))
    run = dict(num_steps=4, progress=False, seed=0)
    threshold = 0.01**2 * y[0].numel()

    def residual(result):
        return float((op(result.restored) - y).square().sum())

    monkeypatch.setattr(default_model, "restore_options", {"consistency_steps": 100})
    recommended = restore(default_model, y, op, "flowchef", **run)
    assert recommended.settings["consistency_steps"] == 100
    assert 0 < recommended.metrics["consistency_steps_taken"] < 100 and residual(recommended) <= threshold
    off = restore(default_model, y, op, "flowchef", consistency_steps=0, **run)
    assert off.settings["consistency_steps"] == 0 and "consistency_steps_taken" not in off.metrics
    assert residual(off) > threshold
    monkeypatch.setattr(default_model, "restore_options", {})
    assert restore(default_model, y, op, "flowchef", **run).settings["consistency_steps"] == 0
    with pytest.raises(ValueError, match="linear operator"):
        restore(default_model, y, make_operator("jpeg:quality=50"), "flowchef", consistency_steps=5, **run)
    with pytest.raises(ValueError, match="samples must be an integer"):
        restore(default_model, y, op, "flowchef", samples=0, **run)


def test_a_noiseless_iteration_ends_on_stagnation_far_before_its_bound():
    """With σ_n = 0 the discrepancy principle never fires; stagnation ends the iteration anyway."""
    from guidance.features.consistency import STAGNATION

    op = make_operator("sr:factor=4")
    x_true, guess = smooth_image(0), smooth_image(1) * 0.5
    y = op(x_true)
    out, steps = pixel_consistency(guess, op, y, noise_std=0.0, max_steps=10_000, return_steps=True)
    assert int(steps[0]) < 1000
    # it stopped at float32's floor of the misfit, where a step no longer lowers it
    assert float((op(out) - y).square().sum()) < 1e-9 * float((op(guess) - y).square().sum())
    with pytest.raises(ValueError, match=r"the consistency steps=1000000000 is more than one run takes \(at most 10000\)"):
        pixel_consistency(guess, op, y, max_steps=10**9)
    assert STAGNATION == 1e-4
