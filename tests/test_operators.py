"""Operator-specific behaviour: kernels, masks, the bicubic downsampler, JPEG against PIL, composition."""

import io
import math

import kornia
import numpy as np
import pytest
import torch
from PIL import Image

from operators import (
    BoxInpainting,
    Inpainting,
    box_mask,
    freeform_mask,
    make_operator,
    mask_from_file,
    parse_spec,
    random_mask,
    random_trajectory_kernel,
)


def test_gaussian_kernel_is_centred_symmetric_and_normalised():
    op = make_operator("gaussian_blur:kernel_size=11,sigma=1.0")
    k = op.kernel
    assert k.shape == (11, 11)
    assert math.isclose(k.sum().item(), 1.0, rel_tol=1e-6)
    assert k.argmax() == 5 * 11 + 5
    torch.testing.assert_close(k, k.flip(0))
    torch.testing.assert_close(k, k.T)
    # a centred kernel leaves a constant image and the centre of mass of a point unchanged
    x = torch.zeros(1, 1, 21, 21)
    x[..., 10, 10] = 1
    y = op(x)[0, 0]
    rows = torch.arange(21.0)
    assert math.isclose((y.sum(1) * rows).sum().item(), 10.0, abs_tol=1e-5)
    assert math.isclose((y.sum(0) * rows).sum().item(), 10.0, abs_tol=1e-5)


def test_separable_gaussian_equals_full_2d_filter():
    op = make_operator("gaussian_blur:kernel_size=9,sigma=2.0")
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    full = kornia.filters.filter2d(x, op.kernel.to(torch.float64)[None], border_type="reflect")
    torch.testing.assert_close(op(x), full)


def test_random_trajectory_kernels_are_seeded_normalised_and_irregular():
    k1 = random_trajectory_kernel(61, 0.5, torch.Generator().manual_seed(0))
    k2 = random_trajectory_kernel(61, 0.5, torch.Generator().manual_seed(0))
    k3 = random_trajectory_kernel(61, 0.5, torch.Generator().manual_seed(1))
    assert k1.shape == (61, 61) and torch.equal(k1, k2) and not torch.equal(k1, k3)
    assert math.isclose(k1.sum().item(), 1.0, rel_tol=1e-9) and (k1 >= 0).all()

    def spread(kernel):  # eigenvalues of the kernel's second-moment matrix: a line has one near zero
        rows, cols = torch.meshgrid(torch.arange(61.0, dtype=torch.float64), torch.arange(61.0, dtype=torch.float64),
                                    indexing="ij")
        points = torch.stack([rows.flatten(), cols.flatten()], 1)
        weights = kernel.flatten()
        mean = (weights[:, None] * points).sum(0)
        centred = points - mean
        return torch.linalg.eigvalsh((weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0))

    def flatness(intensity):  # median over seeds of the minor / major spread
        ratios = []
        for seed in range(8):
            e = spread(random_trajectory_kernel(61, intensity, torch.Generator().manual_seed(seed)))
            ratios.append((e[0] / e[1]).item())
        return sorted(ratios)[4]

    assert flatness(0.0) < 0.01  # intensity 0: straight lines
    assert flatness(0.5) > 0.1  # intensity 0.5: two-dimensional paths
    assert make_operator("motion_blur").kernel.shape == (61, 61)


def test_line_motion_kernel_is_kornias():
    op = make_operator("line_motion_blur:kernel_size=9,angle=30.0,direction=0.5")
    expected = kornia.filters.get_motion_kernel2d(9, 30.0, 0.5)[0].to(torch.float64)
    torch.testing.assert_close(op.kernel.to(torch.float64), expected / expected.sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_downsampling_matches_antialiased_keys_bicubic(factor):
    # torch's anti-aliased bicubic also stretches the a = -0.5 Keys kernel; away from the borders
    # (where torch renormalises instead of reflecting) the two must agree.
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    ours = make_operator("sr", factor=factor)(x)
    reference = torch.nn.functional.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True)
    torch.testing.assert_close(ours[..., 3:-3, 3:-3], reference[..., 3:-3, 3:-3], rtol=0, atol=1e-10)


def test_bicubic_keeps_constants_and_pseudo_inverse_is_minimum_norm():
    op = make_operator("sr:factor=4")
    constant = torch.full((1, 3, 32, 32), 0.3, dtype=torch.float64)
    torch.testing.assert_close(op(constant), torch.full((1, 3, 8, 8), 0.3, dtype=torch.float64))
    y = op(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    x_dagger = op.pseudo_inverse(y)
    # minimum norm: x_dagger lies in the range of the adjoint, so any null-space component is absent
    x_other = x_dagger + (torch.rand_like(x_dagger) - op.pseudo_inverse(op(torch.rand_like(x_dagger))))
    assert x_dagger.norm() <= x_other.norm()


def test_average_pool_pseudo_inverse_is_nearest_upsampling():
    op = make_operator("sr_avgpool:factor=2")
    y = torch.arange(4.0).reshape(1, 1, 2, 2)
    expected = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    torch.testing.assert_close(op.pseudo_inverse(y)[0, 0], expected)


def test_box_mask_fraction_size_and_placement():
    mask = box_mask(64, 128)  # default: a quarter of the area, centred, image aspect ratio
    assert mask.shape == (1, 1, 64, 128)
    assert mask.mean().item() == pytest.approx(0.25, abs=1e-6)  # 1 = missing
    missing = (mask[0, 0] == 1).nonzero()
    assert missing[:, 0].min() == 16 and missing[:, 0].max() == 47
    assert missing[:, 1].min() == 32 and missing[:, 1].max() == 95
    placed = box_mask(32, 32, size=(4, 8), top=2, left=3)
    assert (placed[0, 0, 2:6, 3:11] == 1).all() and placed.sum() == 32


def test_random_mask_has_exact_fraction_and_is_seeded():
    m1, m2, m3 = random_mask(32, 32, 0.3, seed=1), random_mask(32, 32, 0.3, seed=1), random_mask(32, 32, 0.3, seed=2)
    assert m1.sum().item() == round(0.3 * 1024)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_freeform_mask_is_seeded_binary_and_nonempty():
    m1, m2 = freeform_mask(64, 64, seed=3), freeform_mask(64, 64, seed=3)
    assert torch.equal(m1, m2)
    assert set(m1.unique().tolist()) == {0.0, 1.0}
    assert 0.01 < m1.mean().item() < 0.9
    assert not torch.equal(m1, freeform_mask(64, 64, seed=4))


def test_mask_file_white_is_missing_and_invert_swaps(tmp_path):
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[2:4, 2:6] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    mask = mask_from_file(path)
    assert (mask[0, 0, 2:4, 2:6] == 1).all() and mask.sum() == 8
    assert torch.equal(mask_from_file(path, invert=True), 1 - mask)
    op = make_operator(f"inpaint_mask:path={str(path)!r}")
    x = torch.ones(1, 3, 8, 8)
    assert op(x).sum() == 3 * (64 - 8)


def test_inpainting_with_a_tensor_mask_and_lazy_masks_cache_per_size():
    mask = torch.zeros(16, 16)
    mask[:4] = 1  # 1 = missing
    op = Inpainting(mask)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(op(x), x * (1 - mask))
    box = BoxInpainting(fraction=0.25)
    assert box(torch.ones(1, 3, 32, 32)).mean() == pytest.approx(0.75)
    assert box(torch.ones(1, 3, 64, 64)).mean() == pytest.approx(0.75)
    assert box.mask_for(torch.ones(1, 3, 32, 32)) is box.mask_for(torch.ones(1, 3, 32, 32))


def _synthetic_photo(height=64, width=64):
    rows, cols = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(6 * cols + 2 * rows), 0.5 + 0.4 * torch.cos(5 * rows),
                         0.3 + 0.5 * cols * rows])
    image = image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("quality", [10, 50, 90])
def test_jpeg_is_close_to_pil_at_the_same_quality(quality):
    pixels = _synthetic_photo()
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    pil = torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())))).permute(2, 0, 1).float() / 255
    x = pixels.float()[None] / 255 * 2 - 1
    ours = (make_operator("jpeg", quality=quality)(x)[0] + 1) / 2
    codec_error = (x[0] / 2 + 0.5 - pil).abs().mean()
    difference = (ours - pil).abs().mean()
    assert difference < 0.01  # under 2.6 grey levels on average
    assert difference < 0.25 * codec_error  # far closer to PIL's output than to the uncompressed input


def test_composition_equals_sequential_application_and_pipe_spec():
    blur, sr = make_operator("gaussian_blur:kernel_size=5,sigma=1.0"), make_operator("sr:factor=2")
    composed = make_operator("gaussian_blur:kernel_size=5,sigma=1.0 | sr:factor=2", noise_std=0.02)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(composed(x), sr(blur(x)))
    assert composed.is_linear and composed.noise_std == 0.02
    assert not make_operator("compose", operators=["sr:factor=2", "jpeg"]).is_linear
    with pytest.raises(ValueError, match="not linear"):
        make_operator("compose", operators=["sr:factor=2", "jpeg"]).adjoint(torch.rand(1, 3, 16, 16))


def test_function_operator_from_callable_and_string():
    op = make_operator("function", fn=lambda x: 2 * x, linear=True)
    y = torch.rand(1, 1, 4, 4)
    torch.testing.assert_close(op.adjoint(y), 2 * y)
    assert make_operator("function:fn=torch:tanh")(torch.zeros(1, 1, 2, 2)).abs().sum() == 0
    with pytest.raises(ValueError, match="cannot import"):
        make_operator("function:fn=torch:no_such_function")
    with pytest.raises(ValueError, match="not declared linear"):
        make_operator("function:fn=torch:tanh").adjoint(y)


def test_spec_parsing():
    assert parse_spec("sr:factor=4,noise_std=0.05") == ("sr", {"factor": 4, "noise_std": 0.05})
    assert parse_spec("inpaint_box:size=(8,16),top=2") == ("inpaint_box", {"size": (8, 16), "top": 2})
    assert parse_spec(" denoise ") == ("denoise", {})
    assert parse_spec("inpaint_mask:path=masks/a.png") == ("inpaint_mask", {"path": "masks/a.png"})
    op = make_operator("sr:factor=4,noise_std=0.05", noise_std=0.1)  # keyword arguments win
    assert op.factor == 4 and op.noise_std == 0.1
    with pytest.raises(ValueError, match="malformed"):
        parse_spec("sr:factor")
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['sigma'\].*factor"):
        make_operator("sr:sigma=2")
    with pytest.raises(ValueError, match=r"needs the parameter\(s\) \['path'\]"):
        make_operator("inpaint_mask")
