"""The generic adapter: any velocity network, diffusers UNet2DModel with an AutoencoderKL, plain schedules."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_models import SD3_VAE_SCALE, SD3_VAE_SHIFT, tiny_unet, tiny_vae

from guidance.backbones.generic import GenericFlowModel, shifted_linear_sigmas
from guidance.sampler import sample


def test_unet_with_vae_calls_network_with_scaled_timestep():
    unet, vae = tiny_unet(4), tiny_vae(4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = GenericFlowModel(unet, vae, scheduler=scheduler, timestep_scale=1000.0)
    assert model.spatial_factor == 8 and model.size_multiple == 16 and model.default_size == (64, 64)
    assert model.latent_shape(64, 32) == (4, 8, 4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        expected = unet(x, sigma * 1000).sample
    torch.testing.assert_close(model.velocity(x, sigma), expected, rtol=0, atol=0)
    scheduler.set_timesteps(6)
    torch.testing.assert_close(model.sigmas(6), scheduler.sigmas)
    out = sample(model, num_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.image.shape == (1, 3, 64, 64) and torch.isfinite(out.image).all()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    expected = (vae.encode(image).latent_dist.mean - SD3_VAE_SHIFT) * SD3_VAE_SCALE
    torch.testing.assert_close(model.encode(image), expected)


def test_plain_schedule_is_shifted_linspace():
    s = torch.linspace(1, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(shifted_linear_sigmas(4, 3.0), (3 * s / (1 + 2 * s)).float())
    torch.testing.assert_close(shifted_linear_sigmas(4), s.float())


def test_condition_is_passed_through_and_grad_works():
    calls = []

    def network(x, t, label=None):
        calls.append(label)
        return x * t.reshape(-1, 1, 1, 1) + (0 if label is None else label)

    model = GenericFlowModel(network, channels=1)
    x = torch.ones(2, 1, 2, 2, requires_grad=True)
    v = model.velocity(x, 0.5, cond=3.0, grad=True)
    assert calls == [3.0] and v.requires_grad
    v.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))
    assert not model.velocity(x, 0.5).requires_grad


def test_bad_network_output_and_channels_raise():
    model = GenericFlowModel(lambda x, t: x[:, :1], channels=2)
    with pytest.raises(ValueError, match="must return a velocity of shape"):
        model.velocity(torch.zeros(1, 2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="pass channels"):
        GenericFlowModel(lambda x, t: x)
    with pytest.raises(ValueError, match=r"encode expects images of shape \(B, 2, H, W\)"):
        model.encode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="do not belong together"):
        GenericFlowModel(tiny_unet(3), tiny_vae(4))
