"""flowsteer's degradations against deepinv's (Tachella et al., "DeepInverse: a Python package for solving imaging
inverse problems with deep learning", 2025; deepinv 0.5) in float64, once kernel, centring, padding and value range
are aligned: bicubic super-resolution, Gaussian blur for every padding, motion blur (correlation against
convolution), box inpainting, BT.601 decolorization, and Gaussian / Poisson noise drawn from aligned generators."""

import pytest
import torch

deepinv = pytest.importorskip("deepinv")

from operators import from_deepinv, make_operator  # noqa: E402
from operators.convolution import Convolution  # noqa: E402
from operators.motion_blur import random_trajectory_kernel  # noqa: E402

physics = deepinv.physics
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
TOL = dict(rtol=0, atol=1e-10)


@pytest.fixture(autouse=True)
def float64_default():
    """Both libraries build their taps in the default dtype (flowsteer's buffers, deepinv's bicubic_filter arange)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def images(shape=(2, 3, 24, 24), seed=0):
    """[0, 1] images (deepinv's range) and the same images in [-1, 1] (flowsteer's)."""
    x01 = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x01, 2 * x01 - 1


# -- bicubic super-resolution --------------------------------------------------------------------------------------
def test_bicubic_sr_by_two_is_deepinvs_bicubic_downsampling_with_reflect_padding():
    # deepinv's bicubic_filter(2): 8 taps W((t − 3.5) / 2); its conv2d pads 3 before and 4 after, keeps every
    # second sample from the first: output m centred at 2m + 1/2, flowsteer's (m + 1/2)·2 − 1/2. The same.
    _, x = images()
    ours = make_operator("sr:factor=2")
    theirs = physics.Downsampling(filter="bicubic", factor=2, padding="reflect")
    torch.testing.assert_close(ours(x), theirs.A(x), **TOL)
    y = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.adjoint(y), theirs.A_adjoint(y), **TOL)


def test_bicubic_sr_by_four_is_centred_one_pixel_later_than_deepinvs():
    # deepinv samples output m at input 4m and its 16-tap filter is centred half a pixel after: 4m + 1/2; flowsteer
    # (MATLAB's imresize) centres it on the block, 4m + 3/2. deepinv on the image shifted by one pixel agrees away
    # from the borders (circular padding makes the shift a roll).
    _, x = images((2, 3, 32, 32))
    ours = make_operator("sr:factor=4")(x)
    assert (ours - physics.Downsampling(filter="bicubic", factor=4, padding="reflect").A(x)).abs().max() > 0.05
    shifted = physics.Downsampling(filter="bicubic", factor=4, padding="circular").A(x.roll((-1, -1), dims=(-2, -1)))
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], shifted[..., 2:-2, 2:-2], **TOL)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_symmetric_bicubic_sr_is_deepinvs_matlab_downsampling(factor):
    # DownsamplingMatlab (deepinv/physics/functional/imresize.py): centres (m + 1/2)·f − 1/2, the kernel stretched
    # by f, weights normalised, half-sample symmetric borders (a b c | c b a): flowsteer's padding="symmetric"
    side = 8 * factor
    _, x = images((2, 3, side, side))
    torch.testing.assert_close(make_operator(f"sr:factor={factor},padding=symmetric")(x),
                               physics.DownsamplingMatlab(factor=factor).A(x), **TOL)


# -- blur ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["reflect", "replicate", "circular", "constant"])
def test_gaussian_blur_is_deepinvs_blur_for_every_padding(padding):
    _, x = images()
    ours = make_operator(f"gaussian_blur:kernel_size=9,sigma=2.0,padding={padding}")
    kernel = physics.functional.gaussian_blur(sigma=(2.0, 2.0), psf_size=(9, 9), dtype=torch.float64)
    theirs = physics.Blur(filter=kernel, padding=padding)
    torch.testing.assert_close(ours(x), theirs.A(x), **TOL)
    torch.testing.assert_close(ours.adjoint(x), theirs.A_adjoint(x), **TOL)
    if padding == "circular":
        fft = physics.BlurFFT(img_size=(3, 24, 24), filter=kernel)
        torch.testing.assert_close(ours(x), fft.A(x), **TOL)
        torch.testing.assert_close(ours.adjoint(x), fft.A_adjoint(x), **TOL)


def test_motion_blur_is_a_correlation_and_deepinvs_blur_a_convolution():
    # flowsteer filters with kornia's filter2d, y_i = Σ_j k_j x_{i+j}; deepinv's Blur flips the kernel first
    _, x = images()
    kernel = random_trajectory_kernel(9, 0.5, torch.Generator().manual_seed(3))
    assert not torch.equal(kernel, kernel.flip(-1, -2))
    ours = Convolution(kernel, padding="reflect")(x)
    flipped = physics.Blur(filter=kernel.flip(-1, -2)[None, None], padding="reflect").A(x)
    torch.testing.assert_close(ours, flipped, **TOL)
    assert (ours - physics.Blur(filter=kernel[None, None], padding="reflect").A(x)).abs().max() > 1e-3
    motion = make_operator("motion_blur:kernel_size=9,seed=2")
    torch.testing.assert_close(motion(x), physics.Blur(filter=motion.kernel.flip(-1, -2)[None, None],
                                                       padding="reflect").A(x), **TOL)


# -- inpainting and decolorization ---------------------------------------------------------------------------------
def test_box_inpainting_is_deepinvs_inpainting_with_the_complementary_mask():
    # flowsteer's mask marks the missing pixels (1 = missing), deepinv's the kept ones (1 = kept)
    _, x = images()
    ours = make_operator("inpaint_box:size=(10,12),top=5,left=7")
    theirs = physics.Inpainting(img_size=(3, 24, 24), mask=1 - ours.missing_for(x)[0])
    torch.testing.assert_close(ours(x), theirs.A(x), **TOL)
    torch.testing.assert_close(ours.adjoint(x), theirs.A_adjoint(x), **TOL)
    torch.testing.assert_close(ours.pseudo_inverse(x), theirs.A_dagger(x), **TOL)


def test_colorization_is_deepinvs_decolorize_with_bt601_weights():
    _, x = images()
    ours = make_operator("colorize")
    theirs = physics.Decolorize(srf=[0.299, 0.587, 0.114])
    y = ours(x)
    torch.testing.assert_close(y, theirs.A(x), **TOL)
    torch.testing.assert_close(ours.adjoint(y), theirs.A_adjoint(y), **TOL)
    torch.testing.assert_close(ours.pseudo_inverse(y), theirs.A_dagger(y), **TOL)
    # deepinv's default "rec601" weights are 0.66851 · (0.4472, 0.8781, 0.1706) = (0.29896, 0.58702, 0.11405)
    default = physics.Decolorize()
    assert 9e-5 < float((y - default.A(x)).abs().max()) < 2e-4


# -- noise ---------------------------------------------------------------------------------------------------------
def test_gaussian_noise_draws_agree_when_the_generators_are_aligned():
    # both draw one standard normal per measurement entry from the generator (flowsteer torch.randn, deepinv
    # Tensor.normal_), so the same seed gives the same n; flowsteer's σ is deepinv's doubled: y = 2 y₀₁ − A 1
    x01, x = images()
    ours = make_operator("gaussian_blur:kernel_size=9,sigma=2.0,noise_std=0.25")
    kernel = physics.functional.gaussian_blur(sigma=(2.0, 2.0), psf_size=(9, 9), dtype=torch.float64)
    theirs = physics.Blur(filter=kernel, padding="reflect",
                          noise_model=physics.GaussianNoise(sigma=0.125, rng=torch.Generator().manual_seed(5)))
    y01 = theirs(x01)
    y = ours.measure(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(y, 2 * y01 - theirs.A(torch.ones_like(x01)), **TOL)
    noise = y - ours(x)
    assert abs(noise.std().item() / 0.25 - 1) < 0.03  # the statistics as well, over 3456 entries
    assert from_deepinv(theirs).noise_std == 0.25


def test_poisson_noise_draws_agree_when_the_generators_are_aligned():
    # flowsteer: counts ~ P(r (A x + 1) / 2), y = 2 counts / r − 1; deepinv: counts ~ P(A x₀₁ / g), y₀₁ = g counts.
    # A keeps constants (A 1 = 1), so (A x + 1) / 2 = A x₀₁ and r = 1 / g gives the same rates and draws.
    x01, x = images()
    ours = make_operator("sr:factor=2,poisson_rate=64.0")
    theirs = physics.Downsampling(filter="bicubic", factor=2, padding="reflect",
                                  noise_model=physics.PoissonNoise(gain=1 / 64, clip_positive=True,
                                                                   rng=torch.Generator().manual_seed(6)))
    y01 = theirs(x01)
    y = ours.measure(x, torch.Generator().manual_seed(6))
    torch.testing.assert_close(y, 2 * y01 - 1, **TOL)
    counts = (y + 1) / 2 * 64
    assert (counts - counts.round()).abs().max() < 1e-9  # whole photon counts
    assert from_deepinv(theirs, img_size=(3, 24, 24)).poisson_rate == 64
