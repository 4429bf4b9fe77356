"""Operator correctness beyond the generic registry checks: the exact gain ‖A‖², masks in the state_dict,
function operators with vector measurements, and noiseless structural zeros."""

import io

import pytest
import torch
from torch import nn

from operators import (BoxInpainting, Composition, FileMaskInpainting, FunctionOperator, GaussianBlur, Inpainting,
                       RandomInpainting, make_operator)
from operators.base import operator_gain, operator_state
from operators.registry import EXAMPLE_MASK
from test_operators_generic import dense_matrix, dense_top_eigenvalue


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed=0, dtype=torch.float64):
    return torch.rand(shape, generator=_gen(seed), dtype=torch.float64).to(dtype) * 2 - 1


def dense_gain(op, shape):
    """λ_max(AᵀA) of the dense float64 matrix of A (columns A e_j)."""
    return dense_top_eigenvalue(dense_matrix(op.double(), shape))


# -- the gain ‖A‖² ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["sr:factor=2", "sr:factor=4", "line_motion_blur", "sr:factor=2,padding='symmetric'",
                                  "gaussian_blur:kernel_size=5,sigma=1.0",
                                  "gaussian_blur:kernel_size=5,sigma=1.0 | sr:factor=2"])
def test_the_gain_is_the_top_eigenvalue_where_a_constant_start_fell_short(spec):
    """A constant image is not the top eigenvector of SR or of a blur with reflecting borders: the old power
    iteration from it gave 0.257 for SR x2 (exact 0.2704) and 0.0655 for SR x4 (0.0680) at 32 x 32."""
    shape = (1, 1, 32, 32)
    exact = dense_gain(make_operator(spec), shape)
    assert operator_gain(make_operator(spec), shape) == pytest.approx(exact, rel=1e-4)


def test_the_gain_is_deterministic_cached_and_follows_changes_of_the_operator():
    op = make_operator("gaussian_blur:kernel_size=5,sigma=1.0")
    shape = (1, 3, 16, 16)
    first = operator_gain(op, shape)
    assert operator_gain(make_operator("gaussian_blur:kernel_size=5,sigma=1.0"), shape) == first  # seeded start
    state = operator_state(op)
    assert operator_gain(op, shape) == first and operator_state(op) == state
    with torch.no_grad():  # an in-place edit of the kernel changes A: the cached gain must not be reused
        op.kernel_x.mul_(2)
        op.kernel_y.mul_(2)
    assert operator_state(op) != state
    assert operator_gain(op, shape) == pytest.approx(16 * first, rel=1e-4)
    op.padding = "circular"  # so does a changed attribute
    assert operator_gain(op, shape) == pytest.approx(16.0, rel=1e-4)


def test_the_gain_follows_a_loaded_state_dict():
    shape = (1, 1, 12, 12)
    box = BoxInpainting(fraction=0.25)
    assert operator_gain(box, shape) == pytest.approx(1.0, abs=1e-6)
    soft = torch.full((1, 1, 12, 12), 0.5)  # observed weights 1 − m = 0.5: ‖A‖² = 0.25
    box.load_state_dict({"mask_12x12": soft})
    assert operator_gain(box, shape) == pytest.approx(0.25, rel=1e-6)


def test_the_gain_arguments_and_degenerate_operators():
    op = make_operator("sr:factor=2")
    shape = (1, 3, 16, 16)
    assert operator_gain(op, shape, "cpu", 200) == pytest.approx(operator_gain(op, shape), rel=1e-6)  # iters: the cap
    assert operator_gain(op, shape, iters=2) < operator_gain(op, shape)  # a cap that stops short
    with pytest.raises(ValueError, match="iters"):
        operator_gain(op, shape, iters=0)
    with pytest.raises(ValueError, match="rtol"):
        operator_gain(op, shape, rtol=0)
    assert operator_gain(make_operator("jpeg"), shape) == 1.0  # nonlinear: no scale
    with pytest.warns(UserWarning, match="every pixel missing"):
        empty = Inpainting(torch.ones(16, 16))
    assert operator_gain(empty, shape) == 1.0  # A = 0
    exact = dense_gain(make_operator("sr:factor=2"), (1, 1, 16, 16))
    assert operator_gain(op.double(), shape) == pytest.approx(exact, rel=1e-4)  # float64 operators run in float64


# -- masks in the state_dict ---------------------------------------------------------------------------------------

def _reloaded(op, fresh):
    buffer = io.BytesIO()
    torch.save(op.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def test_a_fresh_box_operator_applies_exactly_the_loaded_mask():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 3:9, 20:31] = 1  # not a box the default parameters make
    fresh = BoxInpainting()
    fresh.load_state_dict({"mask_32x32": mask})
    x = _rand((2, 3, 32, 32), dtype=torch.float32)
    assert torch.equal(fresh(x), x * (1 - mask))
    assert torch.equal(fresh.missing_for(x), mask.expand(1, 1, 32, 32))
    assert fresh(_rand((1, 3, 16, 16), dtype=torch.float32)).shape == (1, 3, 16, 16)  # other sizes: its parameters
    assert set(fresh.state_dict()) == {"mask_16x16", "mask_32x32"}


@pytest.mark.parametrize("spec, other", [
    ("inpaint_box:fraction=0.3", "inpaint_box:fraction=0.1"),
    ("inpaint_random:fraction=0.4,seed=3", "inpaint_random:fraction=0.4,seed=4"),
    ("inpaint_freeform:seed=2", "inpaint_freeform:seed=5"),
    ("gaussian_blur:kernel_size=3 | inpaint_random", "gaussian_blur:kernel_size=3 | inpaint_random:seed=9"),
])
def test_generated_masks_survive_a_save_and_load_into_an_operator_with_other_parameters(spec, other):
    op = make_operator(spec, noise_std=0.1)
    x = _rand((2, 3, 24, 24), dtype=torch.float32)
    y = op.measure(x, _gen(5))
    other = make_operator(other, noise_std=0.1)
    assert not torch.equal(other(x), op(x))
    fresh = _reloaded(op, other)
    assert torch.equal(fresh(x), op(x))
    assert torch.equal(fresh.measure(x, _gen(5)), y)


def test_loading_drops_built_masks_the_state_dict_lacks_and_moves_with_to():
    op = RandomInpainting(seed=1)
    op(torch.zeros(1, 1, 8, 8))
    saved = BoxInpainting().state_dict()  # no mask built yet
    op.load_state_dict({})  # the operator's own masks are rebuilt from its parameters
    assert "mask_8x8" not in op.state_dict() and not saved
    op(torch.zeros(1, 1, 8, 8))
    op = op.double()
    assert op.mask_8x8.dtype == torch.float64
    assert op.missing_for(torch.zeros(1, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_mismatched_mask_state_gives_clear_errors():
    with pytest.raises(RuntimeError, match=r"mask_32x32: the saved mask has shape \(1, 1, 16, 16\)"):
        BoxInpainting().load_state_dict({"mask_32x32": torch.zeros(1, 1, 16, 16)})
    with pytest.raises(RuntimeError, match=r"mask values must lie in \[0, 1\]"):
        BoxInpainting().load_state_dict({"mask_8x8": torch.full((1, 1, 8, 8), 2.0)})
    with pytest.raises(RuntimeError, match="builds its masks with a mask function"):
        BoxInpainting().load_state_dict({"fixed_mask": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(RuntimeError, match="has a fixed mask"):
        FileMaskInpainting(EXAMPLE_MASK).load_state_dict({"mask_8x8": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(RuntimeError, match=r"fixed_mask: the saved mask has shape \(1, 1, 8, 8\)"):
        FileMaskInpainting(EXAMPLE_MASK).load_state_dict({"fixed_mask": torch.zeros(1, 1, 8, 8)})


def test_a_file_mask_loads_the_saved_values():
    op = FileMaskInpainting(EXAMPLE_MASK)
    with torch.no_grad():
        op.fixed_mask.copy_(op.fixed_mask.flip(-1))
    fresh = _reloaded(op, FileMaskInpainting(EXAMPLE_MASK))
    x = _rand((1, 3, 64, 64), dtype=torch.float32)
    assert torch.equal(fresh(x), op(x)) and not torch.equal(FileMaskInpainting(EXAMPLE_MASK)(x), op(x))


def test_a_soft_mask_has_a_true_pseudo_inverse():
    mask = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    op = Inpainting(mask).double()
    y = op(_rand((1, 1, 2, 2)))
    x_dagger = op.pseudo_inverse(y)
    torch.testing.assert_close(op(x_dagger), y, rtol=0, atol=1e-15)
    assert x_dagger[0, 0, 1, 0] == 0  # nothing observed there: the minimum-norm value


# -- function operators --------------------------------------------------------------------------------------------

class Projection(nn.Module):
    """y = W vec(x): (B, 3, 4, 4) images to (B, 5) vectors."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 48, generator=_gen(7)), requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T

    def encode(self, x):
        return self(x)

    def transpose(self, y):
        return (y @ self.weight).reshape(-1, 3, 4, 4)


@pytest.mark.parametrize("how", ["module", "bound method", "plain function", "with adjoint"])
def test_a_function_operator_with_vector_measurements_in_float64(how):
    net = Projection()
    weight = net.weight.detach().double()
    fn = {"module": net, "bound method": net.encode, "with adjoint": net.encode,
          "plain function": lambda x: x.flatten(1) @ weight.T.to(x.dtype)}[how]
    op = FunctionOperator(fn, linear=True, adjoint=net.transpose if how == "with adjoint" else None,
                          noise_std=0.01).double()
    if how == "plain function":
        assert op.fn is fn and not list(op.children())
    else:
        assert net.weight.dtype == torch.float64  # .double() reached the callable's module
        assert any(t is net.weight for t in op.parameters())
    x = _rand((2, 3, 4, 4), seed=1)
    y = op(x)
    assert y.shape == (2, 5) and y.dtype == torch.float64
    v = _rand((2, 5), seed=2)
    torch.testing.assert_close((y * v).sum(), (x * op.adjoint(v)).sum(), rtol=1e-12, atol=1e-12)
    assert op.measure(x, _gen(3)).shape == (2, 5)
    assert op.has_pseudo_inverse
    x_dagger = op.pseudo_inverse(y)  # conjugate gradients on A Aᵀ
    torch.testing.assert_close(op(x_dagger), y, rtol=0, atol=1e-10)
    z = _rand((2, 3, 4, 4), seed=4)
    null_part = z - op.pseudo_inverse(op(z))
    assert abs(float((x_dagger * null_part).sum())) < 1e-10


def test_a_function_operator_state_dict_holds_its_module():
    net = Projection()
    op = FunctionOperator(net.encode, linear=True)
    assert list(op.state_dict()) == ["fn_module.weight"]
    other = Projection()
    with torch.no_grad():
        other.weight.mul_(-1)
    fresh = _reloaded(op, FunctionOperator(other.encode, linear=True))
    x = _rand((1, 3, 4, 4), dtype=torch.float32)
    assert torch.equal(fresh(x), op(x))


def test_function_operator_measurement_errors():
    op = FunctionOperator(Projection(), linear=True)
    with pytest.raises(ValueError, match="not known yet: apply the operator to an image first"):
        op.adjoint(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="floating-point tensor with the batch dimension first"):
        op.adjoint(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="keep the batch dimension first"):
        FunctionOperator(lambda x: x.sum())(torch.zeros(2, 1, 2, 2))
    nonlinear = FunctionOperator(torch.tanh)
    assert not nonlinear.has_pseudo_inverse
    with pytest.raises(ValueError, match="not declared linear"):
        nonlinear.pseudo_inverse(torch.zeros(1, 1, 2, 2))


# -- measurement noise ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["inpaint_box", "gaussian_blur:kernel_size=3 | inpaint_box",
                                  "inpaint_box | gaussian_blur:kernel_size=3", "inpaint_box | sr_avgpool:factor=2",
                                  "jpeg | inpaint_random", "inpaint_box | inpaint_random"])
@pytest.mark.parametrize("noise", [{"noise_std": 0.2}, {"poisson_rate": 10.0},
                                   {"noise_std": 0.1, "poisson_rate": 30.0}])
def test_holes_stay_exactly_zero_and_observed_entries_keep_their_noise(spec, noise):
    op = make_operator(spec, **noise)
    x = _rand((2, 3, 16, 16), seed=8, dtype=torch.float32)
    clean = op(x)
    y = op.measure(x, _gen(4))
    holes = (op(_rand((2, 3, 16, 16), seed=9, dtype=torch.float32)) == 0) & (clean == 0)
    assert holes.any()
    assert (y[holes] == 0).all()
    # the same draws as an operator without holes: noise on the observed entries is unchanged
    plain = make_operator("denoise", **noise) if spec.startswith("inpaint_box") and "|" not in spec else None
    if plain is not None:
        unmasked = plain.measure(clean, _gen(4))
        assert torch.equal(y[~holes], unmasked[~holes])


def test_a_composition_reports_the_structural_zeros_of_its_inpainting_stages():
    x = torch.zeros(1, 1, 12, 12)
    first = Composition([BoxInpainting(size=6), GaussianBlur(kernel_size=3, padding="constant")])
    support = first.measured_for(x)
    assert support.shape == (1, 1, 12, 12)
    assert (~support).sum() == 16  # a 6 x 6 hole blurred by a 3 x 3 kernel: its inner 4 x 4 is never measured
    assert Composition(["gaussian_blur:kernel_size=3", "sr:factor=2"]).measured_for(x) is None
    assert Composition(["inpaint_box", "jpeg"]).measured_for(torch.zeros(1, 3, 16, 16)) is None  # JPEG fills holes
