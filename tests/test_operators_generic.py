"""Generic tests run for every registered operator: adding a registry entry is all it takes to be tested."""

import io
import math

import pytest
import torch

from operators import Composition, LinearOperator, list_operators, make_operator, operator_name
from operators.base import operator_gain

ENTRIES = list_operators()
IDS = [entry.name for entry in ENTRIES]
LINEAR = [e for e in ENTRIES if make_operator(e.name, **e.example).is_linear]


def build(entry, **kwargs):
    return make_operator(entry.name, **{**entry.example, **kwargs})


def images(shape=(2, 3, 64, 64), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


def test_registry_has_at_least_ten_operators():
    assert len(ENTRIES) >= 10
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_an_operator_knows_its_registry_name(entry):
    assert operator_name(build(entry)) == entry.name


def test_an_operator_class_outside_the_registry_has_no_name():
    class Halving(Composition):
        pass

    assert operator_name(Halving(["sr:factor=2"])) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_shape_dtype_and_batch_independence(entry, dtype):
    op = build(entry)
    x = images(dtype=dtype)
    y = op(x)
    assert y.dtype == dtype and y.ndim == 4 and y.shape[0] == x.shape[0]
    assert torch.isfinite(y).all()
    # each image is processed on its own: a batch equals its items stacked
    torch.testing.assert_close(op(x[1:]), y[1:], rtol=1e-5, atol=1e-5)
    if op.is_linear:
        assert op.adjoint(y).shape == x.shape
        if op.has_pseudo_inverse:
            assert op.pseudo_inverse(y).shape == x.shape


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_tensors_are_registered_buffers_so_to_device_moves_them(entry):
    op = build(entry)
    registered = {id(t) for t in op.buffers()} | {id(t) for t in op.parameters()}
    stray = [name for name, value in vars(op).items() if isinstance(value, torch.Tensor) and id(value) not in registered]
    assert not stray, f"tensor attributes not registered as buffers: {stray}"
    op = op.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in op.buffers() if b.is_floating_point())
    assert op(images(dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_cuda_matches_cpu(entry, cuda_device):
    op = build(entry, noise_std=0.1)
    x = images()
    y_cpu = op.measure(x, torch.Generator().manual_seed(3))
    adjoint_cpu = op.adjoint(y_cpu) if op.is_linear else None
    op_cuda = op.to(cuda_device)
    y_cuda = op_cuda.measure(x.to(cuda_device), torch.Generator().manual_seed(3))
    assert y_cuda.device.type == cuda_device.type
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    if op.is_linear:
        torch.testing.assert_close(op_cuda.adjoint(y_cuda).cpu(), adjoint_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_differentiable_gradcheck_float64(entry):
    op = build(entry)
    x = images((1, 3, 64, 64), torch.float64, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(op, (x,), fast_mode=True, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_same_seed_same_measurement(entry):
    op = build(entry, noise_std=0.1)
    x = images()
    y1 = op.measure(x, torch.Generator().manual_seed(7))
    y2 = op.measure(x, torch.Generator().manual_seed(7))
    y3 = op.measure(x, torch.Generator().manual_seed(8))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # rebuilding the operator (random kernels and masks are seeded too) gives the same measurement
    assert torch.equal(build(entry, noise_std=0.1).measure(x, torch.Generator().manual_seed(7)), y1)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_gaussian_noise_std_within_three_percent(entry):
    op = build(entry, noise_std=0.05)
    x = images((8, 3, 64, 64), seed=2)
    y = op.measure(x, torch.Generator().manual_seed(0))
    support = op.measured_for(x)
    noise = y - op(x)
    if support is not None:  # structural zeros (inpainting holes) carry no noise
        noise = noise[support.expand_as(noise)]
    measured = noise.std().item()
    assert abs(measured / 0.05 - 1) < 0.03, measured


@pytest.mark.parametrize("entry", LINEAR, ids=[e.name for e in LINEAR])
def test_adjointness_float64(entry):
    op = build(entry)
    x = images((2, 3, 64, 64), torch.float64, seed=3)
    y = images(tuple(op(x).shape), torch.float64, seed=4)
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-6 * x.norm() * y.norm()


@pytest.mark.parametrize("entry", LINEAR, ids=[e.name for e in LINEAR])
def test_pseudo_inverse_is_a_right_inverse_on_the_range(entry):
    op = build(entry)
    if not op.has_pseudo_inverse:
        with pytest.raises(NotImplementedError, match="no cheap pseudo-inverse"):
            op.pseudo_inverse(op(images(dtype=torch.float64)))
        return
    x = images((2, 3, 64, 64), torch.float64, seed=5)
    ax = op(x)
    torch.testing.assert_close(op(op.pseudo_inverse(ax)), ax, rtol=0, atol=1e-8)


def test_poisson_noise_has_the_requested_rate():
    op = make_operator("denoise", poisson_rate=100.0)
    x = torch.zeros(4, 3, 128, 128)  # 0.5 of full scale: 50 expected counts
    y = op.measure(x, torch.Generator().manual_seed(0))
    counts = (y + 1) / 2 * 100
    assert torch.equal(counts.round(), counts.round())  # integers up to float error
    assert (counts - counts.round()).abs().max() < 1e-3
    assert abs(counts.mean().item() - 50) < 0.2
    assert abs(counts.var().item() / 50 - 1) < 0.03


# -- checks after deepinv's operator tests: every variant, the exact gain, state, noise ------------------------------

#: Values tried for the parameters that change an operator's structure; a value the operator refuses is skipped.
VARIANTS = {
    "padding": ("reflect", "replicate", "circular", "constant", "symmetric"),
    "kernel_size": (3, 4, 5),
    "centring": ("centred", "official"),
    "factor": (2, 3),
}
SIZES = ((9, 9), (12, 12), (9, 12))  # odd, even and non-square


def variants(entry):
    """(kwargs, operator) for each combination of the VARIANTS values the entry takes and accepts."""
    names = [name for name in VARIANTS if name in entry.parameters()]
    combos = [{}]
    for name in names:
        combos = [{**combo, name: value} for combo in combos for value in VARIANTS[name]]
    built = []
    for combo in combos:
        try:
            built.append((combo, build(entry, **combo)))
        except ValueError:
            continue
    assert built, f"no variant of {entry.name} could be built"
    return built


def accepts(op, shape) -> bool:
    try:
        with torch.no_grad():
            op(torch.zeros(shape, dtype=torch.float64))
    except ValueError:
        return False
    return True


def accepted_shapes(op, sizes=SIZES, fallback=(64, 64)):
    """Image shapes (1, C, H, W) the operator accepts: channels 1 and 3 where allowed, ``sizes`` (else
    ``fallback``, the size a shipped mask fixes)."""
    channels = (op.in_channels,) if op.in_channels else (1, 3)
    shapes = [(1, c, h, w) for h, w in sizes for c in channels if accepts(op, (1, c, h, w))]
    return shapes or [(1, c, *fallback) for c in channels if accepts(op, (1, c, *fallback))]


def smallest_shape(op):
    """The smallest square image the operator accepts, with 3 channels (1 where allowed above 16 x 16)."""
    for side in (11, 12, 16, 24, 32, 48, 64):
        for channels in ((op.in_channels,) if op.in_channels else ((3, 1) if side <= 12 else (1,))):
            if accepts(op, (1, channels, side, side)):
                return (1, channels, side, side)
    raise AssertionError(f"{op} accepts no image up to 64 x 64")


def autograd_adjoint(op, y):
    """Aᵀ y as the vector-Jacobian product of A (the default of LinearOperator)."""
    return LinearOperator.A_adjoint(op, y)


def overrides_adjoint(op):
    return type(op).A_adjoint is not LinearOperator.A_adjoint


@pytest.mark.parametrize("entry", LINEAR, ids=[e.name for e in LINEAR])
def test_adjointness_and_closed_form_adjoints_over_paddings_kernels_sizes_and_channels(entry):
    checked = 0
    for combo, op in variants(entry):
        op = op.double()
        for index, shape in enumerate(accepted_shapes(op)):
            x = images(shape, torch.float64, seed=10 + index)
            ax = op(x)
            y = images(tuple(ax.shape), torch.float64, seed=20 + index)
            aty = op.adjoint(y)
            assert aty.shape == x.shape, (combo, shape)
            lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
            assert abs(lhs - rhs) <= 1e-10 * float(x.norm() * y.norm()), (combo, shape, lhs, rhs)
            if overrides_adjoint(op):  # the closed form against autograd's vector-Jacobian product
                torch.testing.assert_close(aty, autograd_adjoint(op, y), rtol=0, atol=1e-12, msg=str((combo, shape)))
            checked += 1
    assert checked


#: Operators with a cheap A⁺, and compositions through conjugate gradients on A Aᵀ (A_dagger_cg); a blur alone
#: has neither (its A Aᵀ is too ill-conditioned for CG).
PSEUDO = [e for e in LINEAR if build(e).has_pseudo_inverse or isinstance(build(e), Composition)]


@pytest.mark.parametrize("entry", PSEUDO, ids=[e.name for e in PSEUDO])
def test_pseudo_inverse_has_the_minimum_norm_property(entry):
    """A A⁺ y = y on the range, and A⁺ y ⊥ null(A): ⟨A⁺y, z − A⁺A z⟩ = 0."""
    op = build(entry).double()
    dagger, tol = (op.pseudo_inverse, 1e-10) if op.has_pseudo_inverse else (op.A_dagger_cg, 1e-8)
    for index, shape in enumerate(accepted_shapes(op)[:3]):
        x = images(shape, torch.float64, seed=30 + index)
        z = images(shape, torch.float64, seed=40 + index)
        y = op(x)
        x_dagger = dagger(y)
        assert (op(x_dagger) - y).norm() <= tol * y.norm(), shape
        null_part = z - dagger(op(z))
        assert abs(float((x_dagger * null_part).sum())) <= tol * float(x_dagger.norm() * z.norm()), shape


def dense_matrix(op, shape):
    """A as a float64 (m, n) matrix, column j = A e_j."""
    n = math.prod(shape[1:])
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    with torch.no_grad():
        return torch.cat([op(chunk).reshape(chunk.shape[0], -1) for chunk in basis.split(8)]).T


def dense_top_eigenvalue(a):
    """λ_max(AᵀA) of a dense A by eigvalsh, block by block: AᵀA is block diagonal over the connected
    components of A's nonzero pattern (a mask is diagonal: 1x1 blocks)."""
    pattern = a != 0
    labels = torch.arange(a.shape[1], dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    while True:
        row = torch.where(pattern, labels[None, :], inf).amin(1)
        new = torch.minimum(torch.where(pattern, row[:, None], inf).amin(0), labels)
        if torch.equal(new, labels):
            break
        labels = new
    top = 0.0
    values, counts = labels.unique(return_counts=True)
    singles = torch.isin(labels, values[counts == 1])
    if singles.any():
        top = float(a[:, singles].square().sum(0).max())
    for value in values[counts > 1]:
        block = a[:, labels == value]
        block = block[(block != 0).any(1)]
        top = max(top, float(torch.linalg.eigvalsh(block.T @ block)[-1]))
    return top


@pytest.mark.parametrize("entry", LINEAR, ids=[e.name for e in LINEAR])
def test_operator_gain_is_the_top_eigenvalue_of_the_dense_normal_matrix(entry):
    op = build(entry)
    shape = smallest_shape(op)
    exact = dense_top_eigenvalue(dense_matrix(build(entry).double(), shape))
    gain = operator_gain(op, shape)
    assert gain == pytest.approx(exact, rel=1e-3), (shape, gain, exact)


def perturb_buffers(op):
    """Change every floating buffer in place, keeping masks in [0, 1]: the reloaded operator must take these
    values from the state_dict, not make its own."""
    for buffer in op.buffers():
        if buffer is not None and buffer.is_floating_point() and buffer.numel() > 1:
            buffer.copy_(buffer.flatten().roll(1).reshape(buffer.shape))


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_state_dict_round_trip_gives_the_same_operator(entry):
    op = build(entry, noise_std=0.1)
    shape = smallest_shape(op)
    x = images((2, *shape[1:]), seed=50)
    op(x)  # masks are built on first use
    perturb_buffers(op)
    buffer = io.BytesIO()
    torch.save(op.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(entry, noise_std=0.1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(fresh.state_dict()) == set(op.state_dict())
    assert torch.equal(fresh(x), op(x))
    same_draws = [torch.Generator().manual_seed(1) for _ in range(2)]
    assert torch.equal(fresh.measure(x, same_draws[0]), op.measure(x, same_draws[1]))
    if op.is_linear:
        assert torch.equal(fresh.adjoint(op(x)), op.adjoint(op(x)))


def structural_zeros(op, shape):
    """The entries of A x that two float64 Gaussian probes both map to exactly 0."""
    probes = [images(shape, torch.float64, seed=seed) for seed in (60, 61)]
    with torch.no_grad():
        outputs = [op.double()(p) for p in probes]
    return (outputs[0] == 0) & (outputs[1] == 0)


@pytest.mark.parametrize("noise", [{"noise_std": 0.1}, {"poisson_rate": 20.0}], ids=["gaussian", "poisson"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_no_noise_where_A_x_is_structurally_zero(entry, noise):
    op = build(entry, **noise)
    shape = smallest_shape(op)
    zeros = structural_zeros(build(entry), shape)
    x = images(shape, seed=62)
    y, clean = op.measure(x, torch.Generator().manual_seed(2)), op(x)
    assert (y[zeros] == 0).all()
    support = op.measured_for(x)
    if support is None:
        assert not zeros.any()
    else:
        assert torch.equal(support.expand_as(zeros), ~zeros)
    if "noise_std" in noise:  # every measured entry is noisy
        assert (y[~zeros] != clean[~zeros]).all()
