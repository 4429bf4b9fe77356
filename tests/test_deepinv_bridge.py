"""The deepinv bridge: deepinv physics as flowsteer operators (generic operator checks, value range, noise models,
pseudo-inverses, restoration on an analytic prior), flowsteer operators as deepinv physics (deepinv's own tests and
solvers, round trips), and a flowsteer method as a deepinv reconstructor."""

import copy
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

deepinv = pytest.importorskip("deepinv")

import test_operators_generic as generic  # noqa: E402
from guidance import MeasurementFidelity, flowsteer_reconstructor, get_method  # noqa: E402
from operators import FunctionOperator, from_deepinv, make_operator, to_deepinv  # noqa: E402
from operators.base import operator_gain  # noqa: E402
from tasks.studies.analytic_benchmark import smooth_image_prior  # noqa: E402

physics = deepinv.physics
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _box_mask(height: int = 8, width: int = 8) -> torch.Tensor:
    mask = torch.ones(1, height, width)  # deepinv's mask: 1 = kept
    mask[:, 2:6, 3:7] = 0
    return mask


def _mri_mask() -> torch.Tensor:
    mask = (torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    mask[:, :2] = 1  # the low frequencies
    return mask


def _noise(sigma01: float):
    return physics.GaussianNoise(sigma=sigma01) if sigma01 else physics.ZeroNoise()


@dataclass(frozen=True)
class Case:
    """A deepinv physics, built anew for each use, and the image size it works on."""

    name: str
    make: Callable  # make(sigma01) -> physics
    img_size: tuple
    exact_dagger: bool  # A A⁺ y = y to float64 precision

    def build(self, noise_std: float = 0.0):
        return from_deepinv(self.make(noise_std / 2), img_size=self.img_size)


CASES = [
    Case("blur", lambda s: physics.Blur(filter=physics.functional.gaussian_blur(sigma=(1.0, 1.0), psf_size=(5, 5)),
                                        padding="reflect", noise_model=_noise(s)), (1, 8, 8), False),
    Case("blur_fft", lambda s: physics.BlurFFT(img_size=(1, 8, 8), noise_model=_noise(s),
                                               filter=physics.functional.gaussian_blur(sigma=(1.0, 1.0))),
         (1, 8, 8), True),
    Case("downsampling", lambda s: physics.Downsampling(filter="bicubic", factor=2, padding="reflect",
                                                        noise_model=_noise(s)), (1, 8, 8), True),
    Case("inpainting", lambda s: physics.Inpainting(img_size=(1, 8, 8), mask=_box_mask(), noise_model=_noise(s)),
         (1, 8, 8), True),
    Case("compressed_sensing", lambda s: physics.CompressedSensing(
        m=24, img_size=(1, 8, 8), dtype=torch.float64, rng=torch.Generator().manual_seed(0), noise_model=_noise(s)),
         (1, 8, 8), True),
    Case("mri", lambda s: physics.MRI(mask=_mri_mask(), img_size=(2, 8, 8), noise_model=_noise(s)), (2, 8, 8), True),
    Case("tomography", lambda s: physics.Tomography(angles=4, img_width=8, normalize=False, noise_model=_noise(s)),
         (1, 8, 8), False),
]
IDS = [case.name for case in CASES]
EXACT = [case for case in CASES if case.exact_dagger]
RESTORED = [case for case in CASES if case.name != "blur_fft"]


@pytest.fixture()
def at_its_size(monkeypatch):
    """Run tests/test_operators_generic.py's checks on a case: ``build`` makes the bridged physics, and the checks'
    (B, 3, 64, 64) images become (B, *img_size) images (measurement shapes are drawn as asked)."""
    images = generic.images

    def use(case: Case) -> Case:
        def sized(shape=(2, 3, 64, 64), dtype=torch.float32, seed=0):
            shape = tuple(shape)
            return images((shape[0], *case.img_size) if shape[1:] == (3, 64, 64) else shape, dtype, seed)

        monkeypatch.setattr(generic, "build", lambda entry, **kwargs: entry.build(**kwargs))
        monkeypatch.setattr(generic, "images", sized)
        return case

    return use


GENERIC = [
    generic.test_tensors_are_registered_buffers_so_to_device_moves_them,
    generic.test_differentiable_gradcheck_float64,
    generic.test_same_seed_same_measurement,
    generic.test_adjointness_float64,
]


@pytest.mark.parametrize("check", GENERIC, ids=[check.__name__[5:] for check in GENERIC])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bridged_physics_pass_the_generic_operator_checks(case, check, at_its_size):
    check(at_its_size(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bridged_physics_shapes_dtypes_and_batches(case, dtype, at_its_size):
    generic.test_shape_dtype_and_batch_independence(at_its_size(case), dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_matches_cpu_for_bridged_physics(case, cuda_device, at_its_size):
    generic.test_cuda_matches_cpu(at_its_size(case), cuda_device)


@pytest.mark.parametrize("case", EXACT, ids=[case.name for case in EXACT])
def test_pseudo_inverse_is_exact_where_deepinv_has_one_or_cg_converges(case, at_its_size):
    generic.test_pseudo_inverse_is_a_right_inverse_on_the_range(at_its_size(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_exact_pseudo_inverse_is_deepinvs_and_the_others_are_conjugate_gradients(case):
    op = case.build()
    svd_or_pinv = case.name in ("blur_fft", "inpainting", "compressed_sensing", "mri")
    assert op.uses_deepinv_dagger == svd_or_pinv
    x = torch.rand(2, *case.img_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    y = op.double()(x)
    if svd_or_pinv:
        torch.testing.assert_close(op.pseudo_inverse(y), op.physics.A_dagger(op._native(y)), rtol=0, atol=0)
    else:
        torch.testing.assert_close(op.pseudo_inverse(y), op.A_dagger_cg(y), rtol=0, atol=0)
    # dagger= forces either solver
    forced = from_deepinv(case.make(0.0), img_size=case.img_size, dagger="cg").double()
    assert not forced.uses_deepinv_dagger
    torch.testing.assert_close(forced.pseudo_inverse(y), forced.A_dagger_cg(y), rtol=0, atol=0)
    assert from_deepinv(case.make(0.0), img_size=case.img_size, dagger="deepinv").uses_deepinv_dagger


def test_blur_and_tomography_have_no_exact_pseudo_inverse_but_cg_fits_the_data():
    # reflect-padded Gaussian blur: A Aᵀ has tiny eigenvalues; 4-angle tomography: A is rank-deficient (40 of 48)
    for case in (CASES[0], CASES[-1]):
        op = case.build().double()
        x = torch.rand(2, *case.img_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 - 1
        y = op(x)
        residual = (op(op.pseudo_inverse(y)) - y).norm() / y.norm()
        assert residual < 0.1, (case.name, float(residual))


def test_vector_measurements_become_one_row_images():
    case = CASES[4]
    op = case.build().double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert op(x).shape == (3, 1, 1, 24)
    assert op.physics.A(x).shape == (3, 24)
    y01 = op.physics.A((x + 1) / 2)
    torch.testing.assert_close(op.measurement_to_deepinv(op(x)), y01, rtol=0, atol=1e-12)
    assert op.input_shape((3, 1, 1, 24)) == (3, 1, 8, 8)


# -- the value range -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_deepinv_measurement_maps_exactly_onto_the_flowsteer_one(case):
    op = case.build().double()
    x01 = torch.rand(2, *case.img_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y01 = op.physics.A(x01)  # deepinv's measurement of the [0, 1] image
    y = op.measurement_from_deepinv(y01)
    torch.testing.assert_close(y, op(2 * x01 - 1), rtol=0, atol=1e-12)  # y = 2 y₀₁ − A(1) = A(x)
    torch.testing.assert_close(op.measurement_to_deepinv(y), y01, rtol=0, atol=1e-12)


def test_a_nonlinear_physics_is_mapped_affinely_on_both_sides():
    forward = lambda x, **kwargs: torch.sin(3 * x) + x**2  # noqa: E731
    op = from_deepinv(physics.Physics(A=forward, noise_model=physics.GaussianNoise(sigma=0.02)))
    assert not op.is_linear and not op.has_pseudo_inverse and op.noise_std == pytest.approx(0.04)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    ones = torch.ones(1, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(op(x), 2 * forward((x + 1) / 2) - forward(ones), rtol=0, atol=1e-14)
    torch.testing.assert_close(op.measurement_from_deepinv(forward((x + 1) / 2)), op(x), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="not a LinearPhysics: it has no adjoint"):
        op.adjoint(op(x))


# -- noise models --------------------------------------------------------------------------------------------------
def test_gaussian_noise_doubles_and_is_drawn_on_every_entry():
    op = CASES[0].build(noise_std=0.1)
    assert op.noise_std == pytest.approx(0.1)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    noise = op.measure(x, torch.Generator().manual_seed(0)) - op(x)
    assert abs(noise.std().item() / 0.1 - 1) < 0.03


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=["inpainting", "mri"])
def test_inpainting_and_mri_keep_their_noise_on_the_sampled_entries_as_deepinv_does(case):
    op = case.build(noise_std=0.1)
    x = torch.rand(64, *case.img_size, generator=torch.Generator().manual_seed(8)) * 2 - 1
    noise = op.measure(x, torch.Generator().manual_seed(0)) - op(x)
    sampled = op.physics.mask.expand_as(noise) > 0
    assert torch.all(noise[~sampled] == 0)
    assert abs(noise[sampled].std().item() / 0.1 - 1) < 0.03


def test_poisson_noise_maps_to_the_rate_when_a_keeps_constants():
    blur = CASES[0].make(0.0)
    blur.noise_model = physics.PoissonNoise(gain=1 / 64)
    op = from_deepinv(blur, img_size=(1, 8, 8))
    assert op.poisson_rate == 64 and op.noise_std == 0
    both = CASES[2].make(0.0)
    both.noise_model = physics.PoissonGaussianNoise(gain=0.5, sigma=0.25)
    op = from_deepinv(both, img_size=(1, 8, 8))
    assert (op.poisson_rate, op.noise_std) == (2.0, 0.5)


@pytest.mark.parametrize("noise, message", [
    (physics.UniformGaussianNoise(), "UniformGaussianNoise .* has no flowsteer counterpart: flowsteer operators model "
                                     "additive Gaussian noise"),
    (physics.PoissonNoise(gain=0.1, normalize=False), "normalize=False"),
    (physics.GaussianNoise(sigma=torch.tensor([0.1, 0.2])), "holds 2 values"),
])
def test_unsupported_noise_models_are_refused_by_name(noise, message):
    blur = CASES[0].make(0.0)
    blur.noise_model = noise
    with pytest.raises(ValueError, match=message):
        from_deepinv(blur, img_size=(1, 8, 8))


def test_poisson_noise_is_refused_where_a_does_not_keep_constants_or_the_size_is_unknown():
    inpainting = CASES[3].make(0.0)
    inpainting.noise_model = physics.PoissonNoise(gain=0.1)
    with pytest.raises(ValueError, match="does not map the constant image 1 to 1"):
        from_deepinv(inpainting)
    blur = CASES[0].make(0.0)
    blur.noise_model = physics.PoissonNoise(gain=0.1)
    with pytest.raises(ValueError, match="pass img_size"):
        from_deepinv(blur)


def test_sensor_models_complex_measurements_and_other_objects_are_refused():
    with pytest.raises(ValueError, match="sensor non-linearity"):
        from_deepinv(physics.Denoising(sensor_model=lambda y: y.clamp(0, 1)))
    with pytest.raises(ValueError, match="complex-valued"):
        from_deepinv(physics.CompressedSensing(m=8, img_size=(1, 4, 4), dtype=torch.cfloat,
                                               rng=torch.Generator().manual_seed(0)))
    fourier = from_deepinv(physics.LinearPhysics(A=lambda x, **kwargs: torch.fft.fft2(x)))
    with pytest.raises(ValueError, match="returns complex measurements"):
        fourier(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="takes a deepinv.physics.Physics"):
        from_deepinv(make_operator("sr:factor=2"))
    with pytest.raises(ValueError, match="dagger must be one of"):
        from_deepinv(physics.Denoising(), dagger="svd")


# -- dtype, device, copies -----------------------------------------------------------------------------------------
def test_a_dtype_move_reaches_the_physics_and_a_follows_its_input():
    op = CASES[4].build()
    assert op.physics._A.dtype == torch.float64
    op.float()
    assert op.physics._A.dtype == torch.float32 and op.physics.dtype == torch.float32  # deepinv's adjoint casts to it
    y = op(torch.rand(2, 1, 8, 8))
    assert op.adjoint(y).dtype == torch.float32
    x64 = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert op(x64).dtype == torch.float64 and op.physics._A.dtype == torch.float32  # a converted copy computes it
    assert op.adjoint(op(x64)).dtype == torch.float64


def test_a_deep_copy_copies_deepinvs_generators_so_exact_posteriors_work():
    op = CASES[4].build(noise_std=0.05)
    assert isinstance(op.physics.rng, torch.Generator)
    twin = copy.deepcopy(op)
    assert twin.physics is not op.physics and torch.equal(twin.physics._A, op.physics._A)
    flow = smooth_image_prior((1, 8, 8))
    x = flow.sample_prior(1, torch.Generator().manual_seed(0))
    y = op.measure(x, torch.Generator().manual_seed(1))
    posterior = flow.posterior(op, y, op.noise_std)  # copies the operator to float64
    assert torch.isfinite(posterior.mean()).all()


# -- restoration on an analytic prior ------------------------------------------------------------------------------
# FlowChef's and PnP-Flow's default steps suit ‖A‖ <= 1; compressed sensing (‖A‖² ≈ 7) and unnormalised tomography
# (‖A‖² ≈ 30) take the step divided by ‖A‖² (FLAIR's default data step is already divided by it, and DPS steps by
# the gradient of the residual's norm)
METHODS = {"flowchef": {"normalize_step": True}, "flair": {}, "dps": {}, "pnp_flow": {"normalize_step": True}}
_BASELINES: dict = {}


def _problem(case: Case):
    flow = smooth_image_prior(case.img_size)
    op = case.build(noise_std=0.05)
    generator = torch.Generator().manual_seed(0)
    x_true = flow.sample_prior(4, generator)
    return flow, op, x_true, op.measure(x_true, generator)


def _mse(method: str, case: Case, options: dict) -> float:
    flow, op, x_true, y = _problem(case)
    result = get_method(method, **options)(flow, MeasurementFidelity(op, y), num_steps=20, batch_size=4,
                                           generator=torch.Generator().manual_seed(1), progress=False)
    assert result.x.shape == x_true.shape
    return (result.x.double() - x_true.double()).square().mean().item()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", RESTORED, ids=[case.name for case in RESTORED])
def test_methods_restore_bridged_physics_on_an_analytic_prior(case, method):
    if case.name not in _BASELINES:
        _BASELINES[case.name] = _mse("unguided", case, {})
    unguided = _BASELINES[case.name]
    guided = _mse(method, case, METHODS[method])
    assert math.isfinite(guided) and guided < 0.25 * unguided, (guided, unguided)


def test_vector_shaped_measurements_reach_the_guidance_methods():
    """deepinv's own (B, m) compressed-sensing measurements, through a plain function operator: the methods take
    them as they are (no image reshaping) and restore from them."""
    cs = CASES[4].make(0.0)
    vector_op = FunctionOperator(lambda x: cs.A(x.double()).to(x.dtype), linear=True,
                                 adjoint=lambda y: cs.A_adjoint(y.double()).to(y.dtype),
                                 input_shape=lambda s: (s[0], 1, 8, 8), noise_std=0.05)
    flow = smooth_image_prior((1, 8, 8))
    generator = torch.Generator().manual_seed(0)
    x_true = flow.sample_prior(4, generator)
    y = vector_op.measure(x_true, generator)
    assert y.shape == (4, 24)
    errors = {}
    for method, options in (("unguided", {}), ("flowchef", {"normalize_step": True}), ("flair", {})):
        result = get_method(method, **options)(flow, MeasurementFidelity(vector_op, y), num_steps=20, batch_size=4,
                                               generator=torch.Generator().manual_seed(1), progress=False)
        errors[method] = (result.x.double() - x_true.double()).square().mean().item()
    assert errors["flowchef"] < 0.25 * errors["unguided"] and errors["flair"] < 0.25 * errors["unguided"], errors


# -- flowsteer operators as deepinv physics ------------------------------------------------------------------------
def test_a_flowsteer_operator_is_a_deepinv_linear_physics_that_passes_deepinvs_checks():
    op = make_operator("sr:factor=2,noise_std=0.1")
    phys = to_deepinv(op, img_size=(1, 8, 8), rng=torch.Generator().manual_seed(0))
    assert isinstance(phys, physics.LinearPhysics) and isinstance(phys.noise_model, physics.GaussianNoise)
    assert phys.noise_model.sigma.item() == pytest.approx(0.05)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert phys.adjointness_test(x).item() < 1e-12
    # deepinv's power method starts from torch's global generator (power_method in physics/functional/matrix.py):
    # its Rayleigh quotient approaches ‖A‖² from below, whatever the start
    norm = phys.compute_sqnorm(x[:1], max_iter=200, tol=1e-8, verbose=False).item()
    gain = operator_gain(op, (1, 1, 8, 8))
    assert 0.98 * gain < norm < gain * (1 + 1e-6)
    y = phys.A(x)
    torch.testing.assert_close(phys.A_dagger(y), op.pseudo_inverse(y), rtol=0, atol=0)


def test_deepinvs_proximal_gradient_solver_runs_on_a_bridged_operator():
    # min_x ½‖Ax − y‖² + λ ½‖x‖² by deepinv's PGD equals (AᵀA + λI)⁻¹ Aᵀ y from flowsteer's dense matrix
    op = make_operator("sr:factor=2")
    phys = to_deepinv(op, img_size=(1, 8, 8))
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = phys.A(x)
    solver = deepinv.optim.PGD(data_fidelity=deepinv.optim.L2(), prior=deepinv.optim.Tikhonov(), lambda_reg=0.1,
                               stepsize=1.0, max_iter=300)
    with torch.no_grad():
        estimate = solver(y, phys)
    matrix = torch.stack([op(e.reshape(1, 1, 8, 8)).flatten() for e in torch.eye(64, dtype=torch.float64)], 1)
    closed = torch.linalg.solve(matrix.T @ matrix + 0.1 * torch.eye(64, dtype=torch.float64), matrix.T @ y.flatten())
    torch.testing.assert_close(estimate.flatten(), closed, rtol=0, atol=1e-8)


def test_an_operator_without_a_pseudo_inverse_uses_deepinvs_least_squares():
    op = make_operator("gaussian_blur:kernel_size=3,sigma=0.7")
    assert not op.has_pseudo_inverse
    phys = to_deepinv(op)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = phys.A(x)
    estimate = phys.A_dagger(y)
    assert torch.equal(estimate, physics.LinearPhysics.A_dagger(phys, y))
    assert (phys.A(estimate) - y).norm() < 1e-2 * y.norm()  # deepinv's default tolerance, 1e-4, on another norm


@pytest.mark.parametrize("spec", ["sr:factor=2,noise_std=0.25", "gaussian_blur:kernel_size=3,sigma=1.0,noise_std=0.5",
                                  "inpaint_box:size=3,noise_std=0.125", "colorize:noise_std=0.25"])
def test_the_round_trip_gives_back_the_operator(spec):
    op = make_operator(spec).double()
    channels = 3 if spec.startswith("colorize") else 1
    back = from_deepinv(to_deepinv(op)).double()
    assert back.noise_std == op.noise_std  # σ / 2 is stored by deepinv in float32, exact for these levels
    assert back.uses_deepinv_dagger == op.has_pseudo_inverse
    x = torch.rand(2, channels, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    y = op(x)
    torch.testing.assert_close(back(x), y, rtol=0, atol=1e-14)
    torch.testing.assert_close(back.adjoint(y), op.adjoint(y), rtol=0, atol=1e-14)
    if op.has_pseudo_inverse:
        torch.testing.assert_close(back.pseudo_inverse(y), op.pseudo_inverse(y), rtol=0, atol=1e-14)
    torch.testing.assert_close(back.measure(x, torch.Generator().manual_seed(5)),
                               op.measure(x, torch.Generator().manual_seed(5)), rtol=0, atol=1e-14)


def test_deepinvs_noisy_measurement_of_a_bridged_operator_is_flowsteers():
    # deepinv draws y₀₁ = A x₀₁ + (σ/2) n from the physics' generator; flowsteer y = A x + σ n from the same seed
    op = make_operator("inpaint_box:size=3,noise_std=0.25").double()  # noiseless in the hole, in both
    phys = to_deepinv(op, rng=torch.Generator().manual_seed(9))
    x01 = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y01 = phys(x01)
    expected = op.measure(2 * x01 - 1, torch.Generator().manual_seed(9))
    torch.testing.assert_close(2 * y01 - phys.A(torch.ones_like(x01)), expected, rtol=0, atol=1e-12)


def test_poisson_rates_map_to_deepinvs_gain_only_where_exact():
    phys = to_deepinv(make_operator("sr:factor=2,poisson_rate=64.0"), img_size=(1, 8, 8))
    assert isinstance(phys.noise_model, physics.PoissonNoise) and phys.noise_model.gain.item() == 1 / 64
    with pytest.raises(ValueError, match="does not map the constant image 1 to 1"):
        to_deepinv(make_operator("inpaint_box:size=3,poisson_rate=64.0"), img_size=(1, 8, 8))
    with pytest.raises(ValueError, match="pass img_size"):
        to_deepinv(make_operator("sr:factor=2,poisson_rate=64.0"))


def test_a_nonlinear_operator_becomes_a_deepinv_physics_and_comes_back():
    op = make_operator("function:fn=torch:tanh")
    phys = to_deepinv(op)
    assert isinstance(phys, physics.Physics) and not isinstance(phys, physics.LinearPhysics)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    torch.testing.assert_close(phys.A((x + 1) / 2), (torch.tanh(x) + math.tanh(1)) / 2, rtol=0, atol=1e-14)
    torch.testing.assert_close(from_deepinv(phys)(x), torch.tanh(x), rtol=0, atol=1e-14)


# -- a flowsteer method as a deepinv reconstructor -----------------------------------------------------------------
def test_a_flowsteer_reconstructor_runs_in_deepinvs_test_loop():
    flow = smooth_image_prior((1, 8, 8))
    phys = CASES[3].make(0.025)
    phys.noise_model = physics.GaussianNoise(sigma=0.025, rng=torch.Generator().manual_seed(1))
    x01 = (flow.sample_prior(4, torch.Generator().manual_seed(2)) + 1) / 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x01, phys(x01)), batch_size=2)
    reconstructor = flowsteer_reconstructor(flow, "dps", num_steps=12)
    assert isinstance(reconstructor, deepinv.models.Reconstructor)
    scores = deepinv.test(reconstructor, loader, phys, metrics=[deepinv.loss.metric.MSE()], verbose=False,
                          show_progress_bar=False, compare_no_learning=True, no_learning_method="A_dagger")
    assert scores["MSE"] < 0.1 * scores["MSE no learning"]


def test_the_reconstructor_returns_unit_range_images_reproducibly():
    flow = smooth_image_prior((1, 8, 8))
    phys = CASES[2].make(0.025)
    x01 = (flow.sample_prior(2, torch.Generator().manual_seed(3)) + 1) / 2
    y01 = phys.A(x01)
    reconstructor = flowsteer_reconstructor(flow, "flowchef", num_steps=10, options={"normalize_step": True})
    first = reconstructor(y01, phys)
    assert first.shape == x01.shape and first.dtype == y01.dtype
    assert torch.equal(first, reconstructor(y01, phys))
    assert not torch.equal(first, reconstructor(y01, phys, generator=torch.Generator().manual_seed(9)))
    assert (first - x01).square().mean() < 0.05
    with pytest.raises(ValueError, match="extra argument"):
        reconstructor(y01, phys, x_gt=x01)
    with pytest.raises(ValueError, match="has no option"):
        flowsteer_reconstructor(flow, "flowchef", options={"step": 1.0})
