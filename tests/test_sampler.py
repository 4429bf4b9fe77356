"""The Euler sampler: callback, progress bar, determinism, noise identical to diffusers' randn_tensor."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from guidance.backbones.generic import GenericFlowModel
from guidance.sampler import initial_noise, sample


def point_mass(target: torch.Tensor):
    """Exact velocity of the flow whose data distribution is the single point ``target``: v = (x - c) / s."""

    def network(x, t):
        return (x - target) / t.reshape(-1, 1, 1, 1)

    return network


@pytest.fixture
def model():
    target = torch.linspace(-1, 1, 2 * 8 * 8).reshape(1, 2, 8, 8)
    return GenericFlowModel(point_mass(target), channels=2, sample_size=8, shift=2.0), target


def test_euler_lands_on_the_point_mass(model):
    m, target = model
    out = sample(m, num_steps=5, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.x.shape == (1, 2, 8, 8) and out.x.dtype == torch.float32
    torch.testing.assert_close(out.x, target, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.image, out.x)  # pixel model: decode is the identity


def test_callback_sees_every_step(model):
    m, target = model
    seen = []
    out = sample(m, num_steps=4, generator=torch.Generator().manual_seed(1), progress=False, callback=seen.append)
    assert [info["step"] for info in seen] == [0, 1, 2, 3]
    for i, info in enumerate(seen):
        assert set(info) == {"step", "sigma", "x", "x0_hat"}
        assert float(info["sigma"]) == float(out.sigmas[i])
        assert info["x"].shape == info["x0_hat"].shape == (1, 2, 8, 8)
        torch.testing.assert_close(info["x0_hat"], target.expand_as(info["x"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sigmas, m.sigmas(4))


def test_progress_bar_only_when_asked(model, capsys):
    m, _ = model
    sample(m, num_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    sample(m, num_steps=3, generator=torch.Generator().manual_seed(0), progress=True)
    assert "sampling" in capsys.readouterr().err


def test_same_seed_same_output_other_seed_differs():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    m = GenericFlowModel(lambda x, t: net(x) * t.reshape(-1, 1, 1, 1), channels=3, sample_size=8)
    a = sample(m, num_steps=3, generator=torch.Generator().manual_seed(42), batch_size=2, progress=False)
    b = sample(m, num_steps=3, generator=torch.Generator().manual_seed(42), batch_size=2, progress=False)
    c = sample(m, num_steps=3, generator=torch.Generator().manual_seed(43), batch_size=2, progress=False)
    assert torch.equal(a.x, b.x)
    assert not torch.allclose(a.x, c.x)


def test_given_latents_are_the_start(model):
    m, target = model
    start = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    seen = []
    out = sample(m, num_steps=2, latents=start, progress=False, callback=seen.append)
    assert torch.equal(seen[0]["x"], start) and out.x.shape == (3, 2, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initial_noise_is_randn_tensor(dtype):
    shape = (2, 4, 3, 5)
    ours = initial_noise(shape, torch.Generator().manual_seed(9), "cpu", dtype)
    theirs = randn_tensor(shape, generator=torch.Generator().manual_seed(9), device=torch.device("cpu"), dtype=dtype)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ours = initial_noise(shape, gens, "cpu", dtype)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    theirs = randn_tensor(shape, generator=gens, device=torch.device("cpu"), dtype=dtype)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_below_one_raise(model, steps):
    m, _ = model
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        sample(m, num_steps=steps, progress=False)


def test_missing_size_raises():
    m = GenericFlowModel(lambda x, t: x, channels=1)
    with pytest.raises(ValueError, match="pass height and width"):
        sample(m, num_steps=2, progress=False)


def test_wrong_latents_shape_raises(model):
    m, _ = model
    with pytest.raises(ValueError, match="latents have shape"):
        sample(m, num_steps=2, height=8, width=8, latents=torch.zeros(1, 3, 8, 8), progress=False)
