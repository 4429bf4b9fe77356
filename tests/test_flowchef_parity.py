"""FlowChef parity: the official quirks, each reproduced by ``official_quirks`` / ``centring="official"`` against an
independent transcription of FlowChef/FlowChef commit 9b705fc, and the presets' official values and sources.

The transcriptions below follow the official files named in each test, written over small tensors."""

import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import PROMPT

from guidance import AnalyticGMMFlow, MeasurementFidelity, get_method, start_state
from guidance.methods.common import guided_steps
from guidance.methods.flowchef import PRESETS, QUIRKS, flowchef
from guidance.methods.flowchef_edit import flowchef_edit
from operators import make_operator, operator_spec
from operators.gaussian_blur import GaussianBlur
from operators.inpainting import Inpainting

EDIT_PROMPT = "a white cat in the city"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- (a) the off-centre blur kernel ----------------------------------------------------------------------------

def _official_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """inverse_operators.py, GaussianDeblurOperator: the 2-D kernel on linspace(-k//2 + 0.5, k//2 - 0.5, k),
    normalised, conv2d with padding k//2 and one group per channel."""
    u = torch.linspace(-kernel_size // 2 + 0.5, kernel_size // 2 - 0.5, kernel_size, dtype=torch.float64)
    gx = u.view(1, -1).repeat(kernel_size, 1)
    gy = gx.t()
    kernel = torch.exp(-(gx.pow(2) + gy.pow(2)) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, kernel_size, kernel_size).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, kernel.to(x.dtype), padding=kernel_size // 2, groups=x.shape[1])


@pytest.mark.parametrize("kernel_size, sigma, size", [(11, 1.0, 16), (6, 1.5, 9), (50, 5.0, 20)])
def test_the_official_centring_reproduces_the_official_blur(kernel_size, sigma, size):
    x = torch.rand(2, 3, size, size, generator=_gen(1), dtype=torch.float64) * 2 - 1
    official = _official_blur(x, kernel_size, sigma)
    op = make_operator(f"gaussian_blur:kernel_size={kernel_size},sigma={sigma},padding=constant,centring=official")
    ours = op(x)
    assert ours.shape == official.shape == (2, 3, size + (kernel_size + 1) % 2, size + (kernel_size + 1) % 2)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-6)
    # the adjoint of the grown operator is exact: <A x, y> = <x, A^T y>
    y = torch.rand(official.shape, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close((ours * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-6, atol=0)
    assert make_operator(operator_spec(op)).centring == "official"


def test_the_default_blur_is_centred_and_differs_from_the_official_one():
    x = torch.rand(1, 3, 16, 16, generator=_gen(1), dtype=torch.float64)
    centred = GaussianBlur(kernel_size=11, sigma=1.0, padding="constant")(x)
    assert centred.shape == x.shape
    assert (centred - _official_blur(x, 11, 1.0)).abs().max() > 1e-2  # half a pixel apart
    with pytest.raises(ValueError, match="positive odd integer"):
        GaussianBlur(kernel_size=50, sigma=5.0)
    with pytest.raises(ValueError, match="use padding='constant'"):
        GaussianBlur(kernel_size=50, sigma=5.0, centring="official")
    with pytest.raises(ValueError, match="centring must be one of"):
        GaussianBlur(centring="offcentre")


def test_a_grown_official_measurement_binds_to_a_pixel_fidelity():
    flow = AnalyticGMMFlow(torch.full((1,), 1.0), torch.zeros(1, 3 * 8 * 8), torch.eye(3 * 8 * 8)[None] * 0.1,
                           (3, 8, 8))
    op = GaussianBlur(kernel_size=4, sigma=1.0, padding="constant", centring="official")
    y = op(torch.zeros(1, 3, 8, 8))
    assert y.shape == (1, 3, 9, 9)
    out = flowchef(flow, MeasurementFidelity(op, y), num_steps=3, generator=_gen(), progress=False, decode=False)
    assert out.x.shape == (1, 3, 8, 8) and torch.isfinite(out.x).all()


# -- (b) measurement noise re-sampled inside the loss -------------------------------------------------------------

def _noisy_case():
    d = 16
    g = _gen(11)
    means = torch.stack([torch.full((d,), level) for level in (-0.5, 0.5)]) + 0.1 * torch.randn(2, d, generator=g)
    flow = AnalyticGMMFlow(torch.full((2,), 0.5), means, 0.05 * torch.eye(d).expand(2, d, d).clone(), (1, 4, 4))
    op = make_operator("inpaint_box:size=2", noise_std=0.1)
    y = op.measure(flow.sample_prior(1, _gen(1)), _gen(2))
    return flow, op, y


def _official_pixel_loop(flow, op, y, num_steps, lr, generator):
    """generate_inverseproblems_flowchef.py, sample_ode_generative: at every step i < N - 1,
    z <- z - lr * grad_z mean(mse(degradation(z - t v), y) * mask), where degradation adds fresh noise."""
    state = start_state(flow, None, num_steps, generator=generator, batch_size=1)
    z, sigmas = state.x.double(), state.sigmas.double()
    mask = op.observed_for(z)
    for i in range(num_steps):
        t = sigmas[i]
        v = flow.velocity(z.float(), sigmas[i]).double()
        if i < num_steps - 1:
            z = z.detach().requires_grad_()
            z_h = z - t * v
            degraded = mask * z_h + torch.randn(z_h.shape, generator=generator, dtype=torch.float32).double() * 0.1
            loss = torch.mean((degraded - y.double()) ** 2 * mask)
            z = z.detach() - lr * torch.autograd.grad(loss, z)[0]
        z = z.detach() + v * (sigmas[i + 1] - t)
    return z.float()


def test_official_quirks_resample_the_measurement_noise_at_every_loss_evaluation():
    flow, op, y = _noisy_case()
    common = dict(num_steps=6, progress=False, decode=False, step_size=4.0, window=(0, -1), optimizer="gd")
    fidelity = MeasurementFidelity(op, y, reduction="mean")
    official = _official_pixel_loop(flow, op, y, 6, 4.0, _gen(3))
    quirky = flowchef(flow, fidelity, generator=_gen(3), official_quirks=True, **common).x
    default = flowchef(flow, fidelity, generator=_gen(3), **common).x
    torch.testing.assert_close(quirky, official, rtol=0, atol=1e-5)
    assert (default - official).abs().max() > 1e-3


def test_the_noise_quirk_needs_noise_and_an_explicit_generator():
    flow, op, y = _noisy_case()
    clean = MeasurementFidelity(make_operator("inpaint_box:size=2"), y)
    common = dict(num_steps=4, progress=False, decode=False, step_size=2.0)
    torch.testing.assert_close(flowchef(flow, clean, generator=_gen(3), official_quirks=True, **common).x,
                               flowchef(flow, clean, generator=_gen(3), **common).x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs an explicit generator"):
        flowchef(flow, MeasurementFidelity(op, y), latents=torch.zeros(1, 1, 4, 4), official_quirks=True, **common)
    with pytest.raises(ValueError, match="official_quirks must be True or False"):
        flowchef(flow, clean, generator=_gen(3), official_quirks="yes", **common)


# -- (c, d) the Flux latent target and mask ------------------------------------------------------------------------

def _image(size, seed=5):
    return torch.rand(1, 3, size, size, generator=_gen(seed)) * 2 - 1


def _off_grid_mask(size=32):
    missing = torch.zeros(1, 1, size, size)
    missing[..., 5:19, 9:27] = 1  # not on the 8-pixel latent grid
    return missing


def test_official_quirks_reproduce_the_flux_latent_target_and_mask(flux):
    """fluxcombined.py, FluxPipeline.inpaint: target = encode(full image) * scaling_factor, mask = NEAREST
    resize of the pixel mask, > 0.1 is free, loss = (1000 * mse(x, target * keep) * keep).mean()."""
    vae = flux.codec.autoencoder
    assert vae.config.shift_factor != 0
    image, missing = _image(32), _off_grid_mask()
    op = Inpainting(missing)
    with torch.no_grad():
        target = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    free = F.interpolate(missing, size=target.shape[-2:], mode="nearest") > 0.1
    keep = (~free).float().expand_as(target)
    masked_target = target * keep

    def official(z):
        return (1000 * F.mse_loss(z, masked_target, reduction="none") * keep).mean()

    quirky = MeasurementFidelity(op, op(image), space="latent", weight=1000.0, reduction="mean", official_quirks=True,
                                 unmasked_image=image)
    default = MeasurementFidelity(op, op(image), space="latent", weight=1000.0, reduction="mean")
    for objective in (quirky, default):
        objective.bind(flux, 32, 32)
    z = torch.randn(target.shape, generator=_gen(4))
    torch.testing.assert_close(quirky.loss(z)[0], official(z), rtol=1e-5, atol=1e-6)
    zg = z.clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(quirky.loss(zg).sum(), zg)[0],
                               torch.autograd.grad(official(zg), zg)[0], rtol=1e-5, atol=1e-7)
    assert abs(float(default.loss(z)[0]) - float(official(z))) > 1e-3 * float(official(z))


def test_the_latent_quirks_refuse_what_they_cannot_reproduce():
    image = _image(8)
    op = make_operator("inpaint_box:size=4")
    with pytest.raises(ValueError, match="pass unmasked_image"):
        MeasurementFidelity(op, op(image), space="latent", official_quirks=True)
    with pytest.raises(ValueError, match="use space='latent'"):
        MeasurementFidelity(op, op(image), official_quirks=True, unmasked_image=image)
    with pytest.raises(ValueError, match="read only with official_quirks=True"):
        MeasurementFidelity(op, op(image), space="latent", unmasked_image=image)
    sr = make_operator("sr_avgpool:factor=2")
    with pytest.raises(ValueError, match="needs an inpainting operator"):
        MeasurementFidelity(sr, sr(image), space="latent", official_quirks=True, unmasked_image=image)


# -- (c, d, e) editing ---------------------------------------------------------------------------------------------

def _edit_inputs(model, size=32):
    texts = {"max_sequence_length": 32} if hasattr(model, "has_guidance_embedding") and model.has_guidance_embedding \
        else {"guidance_scale": 1.0}
    src, edit = model.condition(PROMPT, **texts), model.condition(EDIT_PROMPT, **texts)
    latents = torch.randn(1, *model.latent_shape(size, size), generator=_gen(7))
    return _image(size), _off_grid_mask(size)[0, 0], src, edit, latents


def test_flux_official_editing_uses_the_unshifted_source_and_the_binary_nearest_mask(flux):
    """fluxcombined.py, FluxPipeline.edit: encode(image) * scaling_factor; NEAREST resize of the mask, > 0.1 = edit."""
    image, mask, src, edit, latents = _edit_inputs(flux)
    vae = flux.codec.autoencoder
    with torch.no_grad():
        official_source = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    official_mask = (F.interpolate(mask[None, None], size=latents.shape[-2:], mode="nearest") > 0.1).float()
    common = dict(source_image=image, mask=mask, source_prompt=src, edit_prompt=edit, num_steps=2, latents=latents,
                  step_size=0.01, inner_steps=1, progress=False, decode=False)
    quirky = flowchef_edit(flux, official_quirks=True, **common).info
    named = flowchef_edit(flux, official_quirks="flux", **common).info
    default = flowchef_edit(flux, **common).info
    torch.testing.assert_close(quirky["source_latent"], official_source, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(quirky["edit_mask"], official_mask, rtol=0, atol=0)
    torch.testing.assert_close(named["source_latent"], quirky["source_latent"], rtol=0, atol=0)
    assert (default["source_latent"] - official_source).abs().max() > 1e-2
    assert not torch.equal(default["edit_mask"], official_mask)


def test_instaflow_official_editing_pulls_with_the_source_velocity(sd3):
    """pipeline_rf_inversionfree_edit.py: v = v_edit + edit * (v_edit - v_src) * g; Adam re-created each step,
    K times latents_p = z - s v_src (flowsteer's sign), loss = (w * mse(latents_p, gt) * keep).mean();
    keep = the cells where the bilinear mask is exactly 0 (all cells before source_steps)."""
    image, mask, src, edit, latents = _edit_inputs(sd3)
    lr, k, w, g = 0.05, 2, 1e-5, 2.0
    vae = sd3.codec.autoencoder
    with torch.no_grad():
        gt = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    edited = F.interpolate(mask[None, None], size=latents.shape[-2:], mode="bilinear", align_corners=False).bool()
    keep = (~edited).expand_as(latents).float()
    sigma = sd3.sigmas(2, 32, 32)[0]
    v_src, v_edit = sd3.velocity(latents, sigma, src), sd3.velocity(latents, sigma, edit)
    v = v_edit + edited.float() * (v_edit - v_src) * g
    z = latents.clone().requires_grad_()
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(k):
        loss = (w * F.mse_loss(z - sigma * v_src, gt, reduction="none") * keep).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    official = z.detach()

    seen = []
    common = dict(source_image=image, mask=mask, source_prompt=src, edit_prompt=edit, num_steps=2, latents=latents,
                  optimizer="adam", step_size=lr, inner_steps=k, source_steps=0, edit_guidance=g, source_weight=w,
                  progress=False, decode=False)
    flowchef_edit(sd3, official_quirks="instaflow", callback=seen.append, **common)
    torch.testing.assert_close(seen[0]["x"], official, rtol=1e-5, atol=1e-6)
    default = []
    flowchef_edit(sd3, callback=default.append, **common)
    assert (default[0]["x"] - official).abs().max() > 1e-3
    with pytest.raises(ValueError, match="official_quirks must be False, True"):
        flowchef_edit(sd3, official_quirks="instaflw", **common)


# -- presets ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps", [7, 100])
def test_the_pixel_rf_preset_guides_every_step_but_the_last(num_steps):
    window = PRESETS["flowchef_pixel_rf"]["options"]["window"]
    assert list(guided_steps(window, num_steps)) == list(range(num_steps - 1))


def test_the_flux_presets_carry_the_official_values():
    inpaint = PRESETS["flowchef_flux_latent_inpaint"]
    assert inpaint["options"] == {"optimizer": "gd", "step_size": 1.0, "inner_steps": 5, "window": None}
    assert inpaint["guidance_scale"] == 0.5 and inpaint["num_steps"] == 30
    assert inpaint["parity"] == {"options": {"official_quirks": True}, "objective": {"official_quirks": True}}
    assert {"window": (0, 20)} in [alt["options"] for alt in inpaint["alternatives"]]
    ui = PRESETS["flowchef_flux_latent_inpaint_ui_default"]
    assert (ui["options"]["step_size"], ui["options"]["inner_steps"], ui["guidance_scale"]) == (0.5, 1, 0.5)
    for name, k in (("flowchef_flux_edit", 5), ("flowchef_flux_edit_script_default", 4)):
        options = PRESETS[name]["options"]
        assert (options["step_size"], options["inner_steps"], options["source_steps"]) == (0.6, k, 10)
        assert options["edit_guidance"] == 4.5 and options["guidance_scale"] == 0.0
        assert PRESETS[name]["parity"]["options"] == {"official_quirks": "flux"}
    assert PRESETS["flowchef_instaflow_edit"]["parity"]["options"] == {"official_quirks": "instaflow"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_the_paper_an_official_file_and_the_commit(name):
    preset = PRESETS[name]
    source = preset["source"]
    assert "ICCV 2025" in source and "FlowChef/FlowChef commit 9b705fc" in source
    assert re.search(r"[\w/]+\.(py|sh|md|json)\b", source) and "design.md" not in source
    assert set(preset["quirks"]) <= set(QUIRKS)
    parity = preset["parity"]
    assert callable(get_method(preset["method"], **{**preset["options"], **parity["options"]}))
    assert set(parity.get("objective", {})) <= {"official_quirks"}
    for spec in parity.get("operators", []):
        make_operator(spec)
    for alternative in preset.get("alternatives", []):
        get_method(preset["method"], **{**preset["options"], **alternative["options"]})
        assert alternative["origin"]
