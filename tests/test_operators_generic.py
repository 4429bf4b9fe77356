"""Generic tests run for every registered operator: adding a registry entry is all it takes to be tested."""

import pytest
import torch

from operators import Composition, list_operators, make_operator, operator_name

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
    measured = (y - op(x)).std().item()
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
