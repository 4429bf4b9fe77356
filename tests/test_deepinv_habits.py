"""deepinv users' habits: the reconstructor called as deepinv's samplers are (``seed=``, ``get_trajectory=``), with
the model's recommended pixel consistency, FLAIR's colour on deepinv's 90 %-missing inpainting, and the regularised
pseudo-inverse of noisy bridged physics (deepinv 0.5)."""

import pytest
import torch
import torch.nn.functional as F

deepinv = pytest.importorskip("deepinv")

from guidance import flowsteer_reconstructor  # noqa: E402
from guidance.noise import initial_noise  # noqa: E402
from operators import from_deepinv  # noqa: E402
from tasks import load_image  # noqa: E402
from tasks.studies.analytic_benchmark import smooth_image_prior  # noqa: E402

physics = deepinv.physics
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
FLOW = smooth_image_prior((3, 8, 8), components=3)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    return float(10 * torch.log10(1 / (a - b).square().mean()))


def _inpainting(sigma01: float, kept: float = 0.1, size: int = 8, seed: int = 0):
    noise = physics.GaussianNoise(sigma=sigma01, rng=_gen(seed + 1)) if sigma01 else physics.ZeroNoise()
    return physics.Inpainting(img_size=(3, size, size), mask=kept, pixelwise=True, noise_model=noise, rng=_gen(seed))


def _prior_images(n: int, seed: int) -> torch.Tensor:
    return (FLOW.sample_prior(n, _gen(seed)) + 1) / 2


# -- deepinv's calling conventions -----------------------------------------------------------------------------------
def test_seed_and_get_trajectory_follow_deepinvs_samplers():
    phys = _inpainting(0.0, kept=0.5)
    x01 = _prior_images(2, 1)
    y = phys(x01)
    rec = flowsteer_reconstructor(FLOW, "flowchef", num_steps=6, options={"normalize_step": True})
    seeded = rec(y, phys, seed=3)
    assert torch.equal(seeded, rec(y, phys, generator=_gen(3)))
    assert not torch.equal(seeded, rec(y, phys, seed=4))
    # deepinv's PosteriorDiffusion / DPS: (sample, trajectory (N + 1, B, C, H, W)), the initial state first
    x, trajectory = rec(y, phys, seed=3, get_trajectory=True)
    assert torch.equal(x, seeded)  # recording the trajectory changes nothing
    assert trajectory.shape == (7, *x01.shape) and trajectory.dtype == y.dtype
    torch.testing.assert_close(trajectory[0], (initial_noise((2, 3, 8, 8), _gen(3), "cpu", FLOW.dtype).clamp(-1, 1) + 1) / 2)
    torch.testing.assert_close(trajectory[-1], x)
    for call, message in [(dict(seed=1, generator=_gen(1)), "not both"), (dict(seed=True), "seed must be"),
                          (dict(get_trajectory=1), "get_trajectory must be"), (dict(x_init=y), "extra argument")]:
        with pytest.raises(ValueError, match=message):
            rec(y, phys, **call)


def test_the_models_recommended_pixel_consistency_runs_by_default():
    phys = _inpainting(0.0, kept=0.5)
    x01 = _prior_images(2, 2)
    y = phys(x01)
    flow = smooth_image_prior((3, 8, 8), components=3)
    flow.restore_options = {"consistency_steps": 40}
    options = {"normalize_step": True, "step_size": 0.05}
    raw = flowsteer_reconstructor(flow, "flowchef", num_steps=6, options=options, consistency_steps=0)(y, phys)
    default = flowsteer_reconstructor(flow, "flowchef", num_steps=6, options=options)(y, phys)
    misfit = [float((phys.A(out) - y).square().sum()) for out in (raw, default)]
    assert misfit[1] < 0.1 * misfit[0]
    assert _psnr(default, x01) > _psnr(raw, x01)
    with pytest.raises(ValueError, match="consistency_steps must be an integer"):
        flowsteer_reconstructor(flow, "flowchef", consistency_steps=-1)


def test_the_methods_take_the_models_recommended_pixel_consistency():
    from guidance import get_method
    from guidance.objectives import ClassifierObjective, MeasurementFidelity

    flow = smooth_image_prior((3, 8, 8), components=3)
    flow.restore_options = {"consistency_steps": 40}
    op = from_deepinv(_inpainting(0.0, kept=0.5), img_size=(3, 8, 8))
    x = flow.sample_prior(2, _gen(2))
    fidelity = MeasurementFidelity(op, op(x))
    run = get_method("flowchef", normalize_step=True, step_size=0.05)
    def common():
        return dict(num_steps=6, generator=_gen(3), progress=False)

    raw = run(flow, fidelity, **common())
    recommended = run(flow, fidelity, consistency_steps="recommended", **common())
    assert torch.equal(raw.x, recommended.x)  # the run itself is unchanged, the image is corrected after it
    misfit = [float((op(out.image) - fidelity.y).square().sum()) for out in (raw, recommended)]
    assert misfit[1] < 0.1 * misfit[0] and len(recommended.info["consistency_steps_taken"]) == 2
    assert float((recommended.image - x).square().mean()) < float((raw.image.clamp(-1, 1) - x).square().mean())
    assert torch.equal(run(flow, fidelity, consistency_steps=40, **common()).image, recommended.image)
    for value, message in [("all", "consistency_steps must be an integer"), (-1, "consistency steps")]:
        with pytest.raises(ValueError, match=message):
            run(flow, fidelity, consistency_steps=value, **common())
    with pytest.raises(ValueError, match="decode=False"):
        run(flow, fidelity, consistency_steps=5, decode=False, **common())
    with pytest.raises(ValueError, match="the objective is ClassifierObjective"):
        run(flow, ClassifierObjective(lambda im: im.mean((2, 3)), 0, num_classes=3), consistency_steps=5, **common())


# -- FLAIR's colour on deepinv's 90 %-missing inpainting ------------------------------------------------------------
def test_flair_colour_and_psnr_on_ninety_percent_missing_pixels():
    # FLAIR stops its data steps at σ² · m, m the measured entries (the kept pixels of deepinv's Inpainting, whose
    # holes are zeros in y). Counting the holes too made the threshold ~10x the expected misfit with 10 % kept
    # pixels: the data steps stopped early and the holes kept the prior's mean (the olive-grey, low-contrast
    # result of the default model at 64 px). Measured here on the analytic prior (16 images, 20 steps): noiseless
    # 16.5 dB, channel-mean error 0.067; σ₀₁ = 0.05 16.4 dB, 0.068; with the old threshold (emulated by a noise
    # level 1/√(kept fraction) larger) 15.1 dB, 0.088.
    x01 = _prior_images(16, 5)
    scores = {}
    for name, sigma01 in (("clean", 0.0), ("noisy", 0.05), ("holes_counted", 0.05)):
        phys = _inpainting(sigma01)
        y = phys(x01)
        objective = {"noise_std": 2 * sigma01 / float(phys.mask.mean()) ** 0.5} if name == "holes_counted" else {}
        out = flowsteer_reconstructor(FLOW, "flair", num_steps=20, objective=objective)(y, phys)
        colour = float((out.mean((2, 3)) - x01.mean((2, 3))).abs().mean())  # mean per channel vs the reference
        scores[name] = (_psnr(out, x01), colour)
        assert _psnr(out, x01) > _psnr(phys.A_dagger(y), x01) + 10  # far above the zero fill
    assert scores["clean"][1] < 0.08 and scores["clean"][0] > 16
    assert scores["noisy"][1] < 1.1 * scores["clean"][1] and scores["noisy"][0] > scores["clean"][0] - 0.5
    assert scores["holes_counted"][1] > 1.2 * scores["noisy"][1]
    assert scores["holes_counted"][0] < scores["noisy"][0] - 0.5


# -- the regularised pseudo-inverse of noisy physics ----------------------------------------------------------------
def _chelsea(size: int = 64) -> torch.Tensor:
    image = load_image("demos/images/chelsea.png")
    return (F.interpolate(image, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("sigma01", [0.01, 0.05])
def test_the_pseudo_inverse_of_a_noisy_deepinv_blur_stops_at_the_noise(sigma01):
    # 64 px chelsea, Gaussian blur σ 1 px (circular): the exact A⁺ (conjugate gradients on A Aᵀ, or deepinv's SVD
    # for BlurFFT) is noise: 0.4 / −13.8 dB (Blur), −14.2 / −28.2 dB (BlurFFT) at σ₀₁ = 0.01 / 0.05; "auto",
    # CGLS stopped at the discrepancy, 29.9 / 26.1 dB, above the blurred y itself (27.4 / 23.8 dB)
    x01 = _chelsea()
    kernel = physics.blur.gaussian_blur(sigma=(1.0, 1.0))
    before, after = {0.01: 5.0, 0.05: -5.0}[sigma01], {0.01: 29.5, 0.05: 25.5}[sigma01]
    for phys in (physics.Blur(filter=kernel, padding="circular"), physics.BlurFFT(img_size=(3, 64, 64), filter=kernel)):
        phys.noise_model = physics.GaussianNoise(sigma=sigma01, rng=_gen(1))
        op = from_deepinv(phys, img_size=(3, 64, 64))
        y01 = phys(x01)
        y = op.measurement_from_deepinv(y01)
        exact = _psnr((op.pseudo_inverse(y) + 1) / 2, x01)  # the default: exact
        regularised = _psnr((op.pseudo_inverse(y, regularization="auto") + 1) / 2, x01)
        assert exact < before and regularised > after and regularised > _psnr(y01, x01) + 2
    # the closed form and conjugate gradients give the same Tikhonov solution (the same circular blur)
    svd = from_deepinv(physics.BlurFFT(img_size=(3, 64, 64), filter=kernel), img_size=(3, 64, 64))
    cg = from_deepinv(physics.Blur(filter=kernel, padding="circular"), img_size=(3, 64, 64))
    y = cg(2 * x01 - 1)
    torch.testing.assert_close(svd.pseudo_inverse(y, regularization=0.01), cg.pseudo_inverse(y, regularization=0.01),
                               rtol=0, atol=1e-4)


def test_noiseless_and_well_conditioned_pseudo_inverses_are_unchanged():
    x = 2 * _prior_images(2, 3) - 1
    blur = from_deepinv(physics.Blur(filter=physics.blur.gaussian_blur(sigma=(1.0, 1.0)), padding="circular"))
    y = blur(x)
    assert torch.equal(blur.pseudo_inverse(y, regularization="auto"), blur.pseudo_inverse(y, regularization="exact"))
    assert torch.equal(blur.pseudo_inverse(y), blur.A_dagger_cg(y))
    # a noisy 0/1 mask: one CGLS iteration reaches the zero fill, the exact A⁺
    noisy = from_deepinv(_inpainting(0.05, kept=0.5))
    y = noisy.measure(x, _gen(4))
    torch.testing.assert_close(noisy.pseudo_inverse(y, regularization="auto"), noisy.pseudo_inverse(y, regularization=0),
                               rtol=0, atol=1e-6)
    for bad in (-1.0, "tikhonov", True, float("nan")):
        with pytest.raises(ValueError, match="regularization must be"):
            noisy.pseudo_inverse(y, regularization=bad)
