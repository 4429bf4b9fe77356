"""Bad input: one clear ValueError per case, naming the argument, the value and what is allowed."""

import pytest
import torch

from operators import Inpainting, make_operator


def test_wrong_rank():
    with pytest.raises(ValueError, match=r"4-D tensor \(batch, channels, height, width\).*\(3, 8, 8\).*unsqueeze"):
        make_operator("denoise")(torch.rand(3, 8, 8))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"x must have 3 channel\(s\), got 1"):
        make_operator("colorize")(torch.rand(1, 1, 8, 8))


def test_size_not_divisible_by_sr_factor():
    with pytest.raises(ValueError, match="height 30 is not divisible by the super-resolution factor 4.*28 or 32"):
        make_operator("sr:factor=4")(torch.rand(1, 3, 30, 32))


def test_mask_shape_mismatch():
    op = Inpainting(torch.ones(16, 16))
    with pytest.raises(ValueError, match=r"mask shape \(16, 16\) does not match the image size \(32, 32\)"):
        op(torch.rand(1, 3, 32, 32))


def test_even_kernel_size():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer, got 4"):
        make_operator("gaussian_blur:kernel_size=4")


def test_non_positive_kernel_size():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer, got -3"):
        make_operator("gaussian_blur:kernel_size=-3")


def test_non_positive_blur_sigma():
    with pytest.raises(ValueError, match=r"sigma must be a number > 0 \(pixels\), got 0"):
        make_operator("gaussian_blur:sigma=0")


@pytest.mark.parametrize("quality", [0, 101])
def test_jpeg_quality_outside_range(quality):
    with pytest.raises(ValueError, match=f"quality must be an integer in 1..100, got {quality}"):
        make_operator("jpeg", quality=quality)


def test_negative_noise():
    with pytest.raises(ValueError, match=r"noise_std must be a finite number >= 0, got -0.1"):
        make_operator("sr:factor=2", noise_std=-0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_input(bad):
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"x contains 1 NaN or infinite value\(s\)"):
        make_operator("denoise", noise_std=0.1).measure(x)


def test_unknown_operator_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown operator 'gausian_blur'; did you mean 'gaussian_blur'"):
        make_operator("gausian_blur")


def test_image_too_small_for_the_kernel():
    with pytest.raises(ValueError, match="too small for a 61x61 kernel with reflect padding"):
        make_operator("gaussian_blur")(torch.rand(1, 3, 16, 16))


def test_box_that_does_not_fit():
    with pytest.raises(ValueError, match="leaves the 32x32 image"):
        make_operator("inpaint_box:size=8,top=30")(torch.rand(1, 3, 32, 32))
