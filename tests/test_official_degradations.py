"""FLAIR's official degradations (prs-eth/FLAIR, commit c4f55f7; Erbach et al., NeurIPS 2025) as flowsteer operators:
the motion-blur kernel generator seed for seed and its application, the symmetric border of the bicubic SR, and the
benchmark box and DIV2K mask. Reference data: tests/data/flair_motion_kernels.npz holds kernels produced once by
the official generator (``Kernel((61, 61), 0.5).kernelMatrix`` after ``np.random.seed``, and the weight of the
official ``MotionBlurOperator(61, 0.5)`` built after ``np.random.seed(42)``)."""

import fnmatch
import hashlib
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test_operators_generic as generic
from operators import OperatorEntry, make_operator, mask_from_file, operator_spec
from operators.masks import NAMED_MASKS, flair_box_mask, named_mask_path
from operators.motion_blur import official_motion_kernel

REFERENCE = Path(__file__).parent / "data" / "flair_motion_kernels.npz"


@pytest.fixture()
def float64_default():
    """Build operators with float64 buffers (the bicubic taps are stored in the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# -- motion blur ---------------------------------------------------------------------------------------------------
def test_official_motion_kernel_equals_the_official_generator_seed_for_seed():
    reference = np.load(REFERENCE)
    for seed in (42, 7):
        kernel = official_motion_kernel(61, 0.5, seed=seed)
        assert kernel.dtype == torch.float32 and kernel.shape == (61, 61)
        assert torch.equal(kernel, torch.from_numpy(reference[f"seed{seed}"]))
    assert not torch.equal(official_motion_kernel(61, 0.5, seed=42), official_motion_kernel(61, 0.5, seed=7))


def test_the_official_operator_applies_the_second_kernel_after_seeding():
    reference = torch.from_numpy(np.load(REFERENCE)["seed42_operator"])
    op = make_operator("motion_blur:generator=official,seed=42")
    assert torch.equal(op.kernel, reference)
    assert torch.equal(official_motion_kernel(61, 0.5, seed=42, draw=1), reference)
    assert not torch.equal(official_motion_kernel(61, 0.5, seed=42, draw=0), reference)
    assert operator_spec(op) == "motion_blur:seed=42,generator=official"
    assert make_operator("motion_blur").generator == "flowsteer"


def test_the_official_generator_leaves_numpys_global_state_alone():
    before = np.random.get_state()
    official_motion_kernel(61, 0.5, seed=42)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_the_official_generator_refuses_sizes_it_draws_empty():
    with pytest.raises(ValueError, match="too small for the official generator.*size >= 54"):
        make_operator("motion_blur:generator=official,kernel_size=31")
    with pytest.raises(ValueError, match=r"generator must be one of \('flowsteer', 'official'\)"):
        make_operator("motion_blur:generator=numpy")


def test_the_official_blur_is_a_reflect_padded_cross_correlation():
    # FLAIR's Blurkernel: nn.ReflectionPad2d(k // 2), then a grouped nn.Conv2d holding the kernel (no flip)
    op = make_operator("motion_blur:generator=official,seed=42")
    x = torch.rand(1, 3, 72, 66, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    conv = torch.nn.Conv2d(3, 3, 61, padding=0, bias=False, groups=3).to(torch.float64)
    with torch.no_grad():
        conv.weight.copy_(op.kernel.to(torch.float64).expand(3, 1, 61, 61))
        reference = conv(torch.nn.ReflectionPad2d(30)(x))
        flipped = conv.weight.flip(-1, -2)
        convolved = F.conv2d(torch.nn.ReflectionPad2d(30)(x), flipped, groups=3)
    torch.testing.assert_close(op(x), reference, rtol=0, atol=1e-12)
    assert (op(x) - convolved).abs().max() > 1e-2  # a true convolution (flipped kernel) would not match


# -- super-resolution ----------------------------------------------------------------------------------------------
def _keys(u: float, a: float = -0.5) -> float:
    u = abs(u)
    if u <= 1:
        return (a + 2) * u**3 - (a + 3) * u**2 + 1
    return a * u**3 - 5 * a * u**2 + 8 * a * u - 4 * a if u < 2 else 0.0


def official_sr_matrix(factor: int, n: int) -> torch.Tensor:
    """The 1-D (n / f) x n matrix of FLAIR's SRConv for ``sr_bicubic``: 4f taps W((t − 2f + 1/2)/f), output i
    centred at input i·f + ⌊f/2⌋ (taps from −2f to 2f − 1 about it), out-of-range j folded by j → −j−1 and
    j → 2n−1−j."""
    length = 4 * factor
    taps = [_keys((t - length // 2 + 0.5) / factor) for t in range(length)]
    taps = [t / sum(taps) for t in taps]
    matrix = torch.zeros(n // factor, n, dtype=torch.float64)
    for centre in range(factor // 2, n + factor // 2, factor):
        for j in range(centre - length // 2, centre + length // 2):
            folded = -j - 1 if j < 0 else (2 * n - 1 - j if j >= n else j)
            matrix[centre // factor, folded] += taps[j - centre + length // 2]
    return matrix


@pytest.mark.parametrize("factor,side", [(2, 16), (4, 32), (12, 48), (12, 24)])
def test_symmetric_bicubic_equals_the_official_srconv(factor, side, float64_default):
    matrix = official_sr_matrix(factor, side)
    x = torch.rand(2, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(factor))
    expected = matrix @ x @ matrix.T
    op = make_operator(f"sr:factor={factor},padding=symmetric")
    torch.testing.assert_close(op(x), expected, rtol=0, atol=1e-10)
    assert (make_operator(f"sr:factor={factor}")(x) - expected).abs().max() > 1e-3  # whole-sample reflect differs
    assert make_operator(operator_spec(op)).padding == "symmetric" and "padding=symmetric" in operator_spec(op)


@pytest.mark.parametrize("factor", [3, 4, 5])
def test_official_taps_are_centred_half_a_pixel_early_for_odd_factors(factor, float64_default):
    # on a ramp x_j = j an interior output is the centre of mass of its taps
    side = 12 * factor
    ramp = torch.arange(side, dtype=torch.float64).expand(1, 1, side, side)
    ours = make_operator(f"sr:factor={factor},padding=symmetric")(ramp)[0, 0, 0, 4:8]
    official = (official_sr_matrix(factor, side) @ torch.arange(side, dtype=torch.float64))[4:8]
    block_centre = (torch.arange(4, 8, dtype=torch.float64) + 0.5) * factor - 0.5
    torch.testing.assert_close(ours, block_centre, rtol=0, atol=1e-12)
    shift = 0.5 if factor % 2 else 0.0
    torch.testing.assert_close(official, block_centre - shift, rtol=0, atol=1e-12)


def test_symmetric_sr_needs_the_pad_to_fit_and_names_the_paddings():
    op = make_operator("sr:factor=12,padding=symmetric")
    op(torch.zeros(1, 3, 24, 24))  # the pad, 18, fits in 24 pixels
    with pytest.raises(ValueError, match="padding must be one of"):
        make_operator("sr:padding=zero")


# -- the generic operator checks, for the new variants ---------------------------------------------------------------
VARIANTS = [
    OperatorEntry("motion_blur", None, {"generator": "official", "seed": 42}),
    OperatorEntry("sr", None, {"padding": "symmetric"}),
    OperatorEntry("inpaint_box", None, {"layout": "flair"}),
]
VARIANT_IDS = [",".join(f"{k}={v}" for k, v in entry.example.items()) for entry in VARIANTS]
GENERIC = [
    generic.test_an_operator_knows_its_registry_name,
    generic.test_tensors_are_registered_buffers_so_to_device_moves_them,
    generic.test_differentiable_gradcheck_float64,
    generic.test_same_seed_same_measurement,
    generic.test_gaussian_noise_std_within_three_percent,
    generic.test_adjointness_float64,
    generic.test_pseudo_inverse_is_a_right_inverse_on_the_range,
]


@pytest.mark.parametrize("check", GENERIC, ids=[check.__name__[5:] for check in GENERIC])
@pytest.mark.parametrize("entry", VARIANTS, ids=VARIANT_IDS)
def test_new_variants_pass_the_generic_operator_checks(entry, check):
    check(entry)
    spec = operator_spec(generic.build(entry))
    assert make_operator(spec).spec_arguments() == generic.build(entry).spec_arguments()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", VARIANTS, ids=VARIANT_IDS)
def test_new_variants_shape_dtype_and_batch(entry, dtype):
    generic.test_shape_dtype_and_batch_independence(entry, dtype)


@pytest.mark.parametrize("entry", VARIANTS, ids=VARIANT_IDS)
def test_cuda_matches_cpu_for_the_official_variants(entry, cuda_device):
    generic.test_cuda_matches_cpu(entry, cuda_device)


# -- masks ---------------------------------------------------------------------------------------------------------
def test_flair_box_is_the_official_box_at_768():
    mask = flair_box_mask(768, 768)[0, 0]
    expected = torch.zeros(768, 768)
    expected[128:640, 384:640] = 1  # configs/inpainting.yaml: mask: [128, 640, 384, 640]
    assert torch.equal(mask, expected)
    assert mask.sum().item() == 512 * 256 and mask.sum().item() / 768**2 == pytest.approx(0.2222, abs=1e-4)
    op = make_operator("inpaint_box:layout=flair")
    assert torch.equal(op.missing_for(torch.zeros(1, 3, 768, 768))[0, 0], expected)
    assert operator_spec(op) == "inpaint_box:layout=flair"
    # other sizes: each edge rounded to the nearest pixel (512: rows 85:427, columns 256:427)
    rows, cols = flair_box_mask(512, 512)[0, 0].nonzero().unbind(1)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (85, 427, 256, 427)
    with pytest.raises(ValueError, match="layout='flair' fixes the box.*drop fraction"):
        make_operator("inpaint_box:layout=flair,fraction=0.2")


# sha256 of DIV2k_mask.npy (prs-eth/FLAIR, c4f55f7) as a uint8 array, True (1) = observed, row-major
DIV2K_SHA256 = "560544ce9b5373fdf8f6b505bfd3b4f494b265c738d458fcf732675fae860308"


def test_the_shipped_div2k_mask_is_flairs_pixel_for_pixel():
    path = Path(named_mask_path("flair_div2k"))
    missing = mask_from_file(path)[0, 0]
    observed = (missing == 0).numpy().astype(np.uint8)
    assert observed.shape == (768, 768)
    assert hashlib.sha256(observed.tobytes()).hexdigest() == DIV2K_SHA256
    assert int(missing.sum()) == 94014 and missing.mean().item() == pytest.approx(1 - 0.840606689453125, abs=1e-9)
    for row, col in [(57, 47), (391, 132), (728, 694)]:
        assert missing[row, col] == 1
    for row, col in [(0, 0), (383, 302), (56, 47), (729, 694)]:
        assert missing[row, col] == 0
    patterns = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["operators"]
    assert any(fnmatch.fnmatch(f"examples/{path.name}", pattern) for pattern in patterns)


def test_the_div2k_mask_by_name():
    op = make_operator("inpaint_mask:name=flair_div2k")
    assert operator_spec(op) == "inpaint_mask:name=flair_div2k"
    x = torch.rand(1, 3, 768, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.rand(1, 3, 768, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert math.isclose((op(x) * y).sum().item(), (x * op.adjoint(y)).sum().item(), rel_tol=1e-12)
    torch.testing.assert_close(op(op.pseudo_inverse(op(x))), op(x), rtol=0, atol=0)
    assert (op(x) == 0).double().mean().item() == pytest.approx(94014 / 768**2, abs=1e-9)
    with pytest.raises(ValueError, match=r"unknown mask name 'div2k'; the shipped masks are: flair_div2k \("):
        make_operator("inpaint_mask:name=div2k")
    with pytest.raises(ValueError, match="'flair_div2k' is 768x768 but the image is 512x512; resize or crop"):
        op(torch.zeros(1, 3, 512, 512))
    with pytest.raises(ValueError, match="either path .* or name"):
        make_operator("inpaint_mask", name="flair_div2k", path=named_mask_path("flair_div2k"))
    assert set(NAMED_MASKS) == {"flair_div2k"}
