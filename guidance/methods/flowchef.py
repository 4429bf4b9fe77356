"""FlowChef: steering a frozen rectified flow in its vector field with gradient skipping
(Patel et al., "Steering Rectified Flow Models in the Vector Field for Controlled Image Generation", ICCV 2025).

The velocity is evaluated once per step, without autograd, and then held fixed. The clean estimate
x0_hat = x - s v is then an affine function of x with identity Jacobian, so ∇_x L(x0_hat) = ∇_{x0_hat} L:
the guidance gradient never goes through the flow network (only through the decoder for pixel-space
objectives)::

    x ~ N(0, I)                                   (no inversion)
    for i in 0 .. N-1:
        v = v_theta(x, s_i, c)                    no grad, held fixed
        if i is in the guided window and s_i > stop_sigma:
            repeat K times:
                x0_hat = x - s_i v
                x = optimizer_step(x, ∇_{x0_hat} L(x0_hat))
        x = x + (s_{i+1} - s_i) v                 Euler with the old v: no re-evaluation, no noise

Inverse problems, classifier guidance and reward guidance all run through this one loop; the objective
(:mod:`guidance.objectives`) decides what L is. ``PRESETS`` at the end of this file hold the paper's settings.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from operators.checks import check_work

from ..flow import euler_step, x0_from_velocity
from ..objectives import MeasurementFidelity, Objective, ResampledNoiseFidelity, objective_gradient
from ..sampler import start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     data_term_gain, guided_steps, measurement_batch_size, reference_scale)

__all__ = ["DEFAULT_STEP_SIZE", "OPTIMIZERS", "InnerOptimizer", "PRESETS", "flowchef", "loss_history"]

OPTIMIZERS = ("gd", "sgd", "adam")

# Gradient-descent step on the clean estimate. With the measurement objective ‖A(x0_hat) - y‖² (sum over
# the measurement, weight 1) the gradient is 2 Aᵀ(A x0_hat - y): a step of 0.5 moves x0_hat onto the measured
# values of an inpainting mask in one update. On the analytic Gaussian-mixture benchmark (1x8x8, 50 steps,
# noise 0.05: box inpainting, SR x2, Gaussian blur) it gives MSE/MMSE 1.8-2.8 over three seeds, while 0.75
# already fails for the blur (MSE/MMSE 53) and 1.0 diverges for all but SR (the shift in x accumulates over
# the steps, since the true clean estimate moves far less than x0_hat = x - s v with v held fixed).
DEFAULT_STEP_SIZE = 0.5


class InnerOptimizer:
    """The update x <- x - step(∇L) of FlowChef's inner loop, with fresh state for one sampling step.

    * ``"gd"``: plain gradient descent, x <- x - step_size · g (what the paper's pixel and Flux code do);
    * ``"sgd"``: ``torch.optim.SGD(lr=step_size, momentum=momentum)``. Without momentum it is gd; with
      momentum the velocity buffer accumulates over the K inner updates of one step only;
    * ``"adam"``: ``torch.optim.Adam(lr=step_size)`` with default betas and eps. As in the paper's SD1.5 code
      it is created anew at every sampling step, so its first update is step_size · g / (|g| + eps)
      elementwise: a sign-like step whose size ignores the scale of the loss.

    Build one per sampling step with the state ``x``; :meth:`step` takes a gradient and returns the new x.
    """

    def __init__(self, kind: str, x: torch.Tensor, step_size: float, momentum: float = 0.0):
        self.kind, self.step_size = check_optimizer(kind, momentum), float(step_size)
        self.x = x
        self._torch = None
        if self.kind == "sgd":
            self.x = x.detach().clone()
            self._torch = torch.optim.SGD([self.x], lr=self.step_size, momentum=float(momentum))
        elif self.kind == "adam":
            self.x = x.detach().clone()
            self._torch = torch.optim.Adam([self.x], lr=self.step_size)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """Apply one update with gradient ``grad`` (same shape as x) and return the updated x."""
        if self._torch is None:
            self.x = self.x - self.step_size * grad
            return self.x
        self.x.grad = grad.to(self.x.dtype)
        self._torch.step()
        self.x.grad = None
        return self.x


def rms(grad: torch.Tensor) -> torch.Tensor:
    """Each sample's root mean square, shaped to divide ``grad`` (no host read)."""
    return grad.square().flatten(1).mean(1).sqrt().clamp_min(1e-12).reshape(-1, *[1] * (grad.ndim - 1))


def check_optimizer(kind: str, momentum: float = 0.0) -> str:
    """Validate an optimizer name (and momentum, which only "sgd" takes)."""
    if kind not in OPTIMIZERS:
        close = difflib.get_close_matches(str(kind), OPTIMIZERS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown optimizer {kind!r}{hint} Choose one of {', '.join(OPTIMIZERS)}")
    check_nonnegative(momentum, "momentum")
    if momentum and kind != "sgd":
        raise ValueError(f"momentum={momentum} applies to optimizer='sgd' only, not {kind!r}; drop it or use 'sgd'")
    if momentum >= 1:
        raise ValueError(f"momentum must be < 1, got {momentum}")
    return kind


def loss_history(losses: list[list[torch.Tensor]], inner_steps: int, batch: int) -> torch.Tensor:
    """Stack per-step lists of (B,) losses into a (guided steps, K, B) float32 CPU tensor (one transfer at the end)."""
    if not losses or not inner_steps:
        return torch.zeros(len(losses), inner_steps, batch)
    return torch.stack([torch.stack(per_step) for per_step in losses]).float().cpu()


def _divergence_hint(step_size: float, optimizer: str, normalize_step: bool, normalize: str | None) -> str:
    """The fix a DivergenceError of flowchef names: a smaller step, and the scale-free steps not yet in use."""
    hint = f"use a smaller step_size than {step_size}"
    if optimizer != "adam" and not normalize_step and not normalize:
        hint += (", or normalize_step=True (the step divided by ‖A‖² of a linear pixel-space operator) or "
                 "normalize='grad' (a step of step_size in RMS, whatever the loss's scale)")
    return hint


@torch.no_grad()
def flowchef(
    model,
    objective: Objective,
    *,
    num_steps: int = 28,
    cond: Any = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    latents: torch.Tensor | None = None,
    decode: bool = True,
    on_step_end: Callable | None = None,
    step_size: float = DEFAULT_STEP_SIZE,
    inner_steps: int = 1,
    optimizer: str = "gd",
    momentum: float = 0.0,
    window: tuple[int, int] | None = None,
    stop_sigma: float = 0.0,
    normalize_step: bool = False,
    normalize: str | None = None,
    check_divergence: bool = True,
    official_quirks: bool = False,
) -> MethodResult:
    """Guide a frozen flow model toward low ``objective`` with FlowChef's gradient skipping (ICCV 2025).

    Each step evaluates v = v_theta(x, s_i, c) once without gradient; inside the guided window it repeats
    K = ``inner_steps`` times x0_hat = x - s_i v, x <- optimizer_step(x, ∇_{x0_hat} L(x0_hat)) (identity Jacobian,
    v held fixed), then moves x <- x + (s_{i+1} - s_i) v with the same v. One network evaluation per step
    (a batched classifier-free-guidance call counts once), whatever K is.

    Args:
        model: a :class:`~guidance.backbones.base.FlowModel`.
        objective: a :class:`~guidance.objectives.Objective` (measurement fidelity, classifier, reward, ...).
        num_steps, cond, height, width, generator, progress, latents, decode: as in :func:`guidance.sample`.
        batch_size: as in :func:`guidance.sample`; by default one sample per measurement for a
            MeasurementFidelity whose y holds several (a batch-1 y is shared).
        callback: called each step, after the guidance and before the Euler move, with ``{"step": i,
            "sigma": s_i, "x": x, "x0_hat": x - s_i v, "loss": L at the last clean estimate evaluated (B,) or
            None outside the window}``.
        step_size: learning rate of the inner optimizer (>= 0; 0 reproduces unguided sampling exactly).
        inner_steps: K, optimizer updates per guided step (>= 0).
        optimizer: ``"gd"``, ``"sgd"`` or ``"adam"`` (see :class:`InnerOptimizer`).
        momentum: momentum of ``"sgd"``.
        window: ``(start, stop)`` step indices to guide (None: every step; see ``guided_steps``).
        stop_sigma: guide only the steps of the window whose noise level s_i is above it (0: all of them). A
            window in noise levels rather than step indices, so it means the same at any number of steps.
        normalize_step: divide the step by ‖A‖² (:func:`~guidance.methods.common.data_term_gain`, computed once),
            so that one step suits masks and blurs (‖A‖² = 1) and SR×f (about 1/f²) alike. "gd" and "sgd" only:
            Adam's step already ignores the scale of the loss. No effect on objectives without a linear
            pixel-space operator.
        normalize: ``"grad"`` divides each gradient by its root mean square over the sample (per sample), so that
            ``step_size`` is the RMS move of x per update in latent units whatever the scale of the loss: the
            step for a custom objective (``CallableObjective``, ``RewardObjective``, a classifier) without
            guessing its scale; 0.02-0.1 suits unit-variance latents. None (default): the plain gradient.
        check_divergence: stop with a :class:`~guidance.methods.common.DivergenceError` naming the step and the
            state's scale when the state becomes NaN or infinite, or when a sample's RMS exceeds
            ``DIVERGENCE_FACTOR`` (100) times its reference scale, the larger of 1, the starting noise's RMS and
            the model's data RMS where known (:func:`~guidance.methods.common.reference_scale`): unguided states
            stay near 1×. Checked on the device and read once, after the loop.
        official_quirks: True reproduces, for parity runs, what FlowChef's official loop does differently: with
            a pixel-space :class:`~guidance.objectives.MeasurementFidelity` whose noise_std is > 0 the
            measurement noise is drawn anew, from ``generator`` after the starting noise, at every evaluation
            of the loss (:class:`~guidance.objectives.ResampledNoiseFidelity`, after
            ``inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py``, FlowChef/FlowChef
            commit 9b705fc). The quirks of the objective and the operator are switched on there:
            ``MeasurementFidelity(official_quirks=True)``, ``GaussianBlur(centring="official")``.

    Returns:
        :class:`MethodResult` with ``info["loss"]`` (guided steps, K, B): the loss before each inner update,
        ``info["guided_steps"]`` their indices.
    """
    if not isinstance(objective, Objective):
        raise ValueError(f"flowchef needs an Objective (e.g. MeasurementFidelity, ClassifierObjective), "
                         f"got {type(objective).__name__}")
    check_nonnegative(step_size, "step_size")
    check_count(inner_steps, "inner_steps", minimum=1, fix="inner_steps=0 guides no step: for sampling without "
                "guidance use the method 'unguided'")
    check_optimizer(optimizer, momentum)
    if check_flag(normalize_step, "normalize_step") and optimizer == "adam":
        raise ValueError("normalize_step applies to optimizer 'gd' or 'sgd': Adam's step already ignores the scale "
                         "of the loss; set normalize_step=False (a model may recommend it) or use 'gd'")
    if normalize not in (None, "grad"):
        raise ValueError(f"normalize must be None or 'grad' (the step divided by the gradient's RMS), got "
                         f"{normalize!r}")
    if normalize and (normalize_step or optimizer == "adam"):
        raise ValueError("normalize='grad' already makes the step scale-free: use it with optimizer 'gd' or 'sgd' "
                         "and normalize_step=False")
    guided = guided_steps(window, num_steps)
    stop_sigma = check_nonnegative(stop_sigma, "stop_sigma")
    loss_objective = objective
    if check_flag(official_quirks, "official_quirks") and isinstance(objective, MeasurementFidelity) \
            and objective.space == "pixel" and objective.noise_std > 0:
        if generator is None:
            raise ValueError("official_quirks=True re-samples the measurement noise at every loss evaluation and "
                             "needs an explicit generator: pass generator=torch.Generator().manual_seed(0)")
        loss_objective = ResampledNoiseFidelity(objective, generator)

    batch_size = measurement_batch_size(objective, batch_size, latents)

    model = CountingModel(model)
    state = start_state(model, cond, num_steps, height, width, generator, batch_size, latents)
    x, cond, sigmas = state.x, state.cond, state.sigmas
    check_work({"num_steps": num_steps, "inner_steps": inner_steps}, "flowchef")
    if stop_sigma:
        window_guided, guided = guided, [i for i in guided if float(sigmas[i]) > stop_sigma]
        if not guided:
            raise ValueError(f"stop_sigma={stop_sigma:g} is at or above the noise level of every guided step (the "
                             f"highest is {float(sigmas[window_guided[0]]):.3g}), so flowchef would guide nothing; "
                             f"use a stop_sigma below that (0: guide every step), or the method 'unguided'")
    objective.bind(model, state.height, state.width)
    image_shape = (1, model.image_channels, state.height, state.width)
    lr = step_size / data_term_gain(objective, image_shape, x.device) if normalize_step else step_size

    losses: list[list[torch.Tensor]] = []
    monitor = DivergenceMonitor("flowchef", _divergence_hint(step_size, optimizer, normalize_step, normalize),
                                check_divergence, reference_scale(model, x))
    for i in tqdm(range(num_steps), disable=not progress, desc="flowchef"):
        s_i, s_next = sigmas[i], sigmas[i + 1]
        v = model.velocity(x, s_i, cond)  # once per step, no autograd; held fixed below
        loss = None
        if i in guided:
            step_losses = []
            opt = InnerOptimizer(optimizer, x, lr, momentum)  # fresh optimizer state every step
            for _ in range(inner_steps):
                x0_hat = x0_from_velocity(x, v, s_i)
                loss, grad = objective_gradient(loss_objective, model, x0_hat)  # = ∇_x L(x - s_i v)
                if normalize:
                    grad = grad / rms(grad)
                x = opt.step(grad)
                step_losses.append(loss)
            losses.append(step_losses)
        if callback is not None:
            callback({"step": i, "sigma": s_i, "x": x, "x0_hat": x0_from_velocity(x, v, s_i), "loss": loss})
        x = euler_step(x, v, s_i, s_next)  # the old v: no re-evaluation, no noise
        x = step_end(on_step_end, i, s_i, s_next, {"x": x})
        monitor.update(x, i)  # no host-device synchronisation inside the loop
    monitor.finish()

    image = model.decode(x) if decode else None
    info = {"loss": loss_history(losses, inner_steps, x.shape[0]), "guided_steps": list(guided)}
    return MethodResult(x=x, image=image, nfe=model.nfe, sigmas=sigmas, info=info)


# Parity settings of FlowChef's official experiments (Patel et al., "Steering Rectified Flow Models in the Vector Field
# for Controlled Image Generation", ICCV 2025; official code FlowChef/FlowChef at commit 9b705fc). Keys: method,
# num_steps, options (the method's keyword options), objective (MeasurementFidelity keyword arguments), operators
# (specs the setting was published for, or None), source (the paper and the official files); some add resolution,
# guidance_scale (the CFG scale, or Flux's distilled guidance, for model.condition) and alternatives (other official
# values of the options, each with its origin). quirks names what the official code does that flowsteer does not
# (name -> description); parity holds what reproduces them
# (guidance.features.presets.get_preset(name, official_quirks=True)): "options" to merge into the method's
# options, "objective" into the MeasurementFidelity arguments (with official_quirks=True it also needs
# unmasked_image, the complete image) and "operators", the official operators.
OFFICIAL_COMMIT = "9b705fc"
_PAPER = "Patel et al., Steering Rectified Flow Models in the Vector Field, ICCV 2025"


def _source(files: str, setting: str) -> str:
    return f"{_PAPER}; FlowChef/FlowChef commit {OFFICIAL_COMMIT}: {files}. {setting}"


QUIRKS = {
    "off_centre_blur_kernel": "Gaussian taps on linspace(-k//2 + 0.5, k//2 - 0.5, k) with k//2 zeros of padding: "
                              "half a pixel off centre for odd k, an (H + 1) x (W + 1) output for even k "
                              "(GaussianBlur(centring='official', padding='constant'))",
    "resampled_measurement_noise": "the loss re-draws the measurement noise at every evaluation when noise_std > 0 "
                                   "(flowchef(official_quirks=True))",
    "unshifted_unmasked_latent_target": "the latent target is scaling_factor * E(x) without the VAE shift, encoded "
                                        "from the complete (unmasked) image (MeasurementFidelity(official_quirks="
                                        "True, unmasked_image=x); flowchef_edit(official_quirks=...))",
    "binary_latent_mask": "the latent mask is binary: nearest-neighbour downsampling of the pixel mask, a cell is "
                          "free when it exceeds 0.1 (MeasurementFidelity(official_quirks=True); "
                          "flowchef_edit(official_quirks='flux'))",
    "binary_bilinear_edit_mask": "the latent edit mask is binary: bilinear downsampling, a cell is edited when "
                                 "it is not exactly 0 (flowchef_edit(official_quirks='instaflow'))",
    "pull_with_source_velocity": "the source pull evaluates the clean estimate with the source-prompt velocity, "
                                 "x - s v_src, while the Euler step uses the edit velocity "
                                 "(flowchef_edit(official_quirks='instaflow'))",
}


def _quirks(*names: str) -> dict[str, str]:
    return {name: QUIRKS[name] for name in names}


_FLUX_INPAINT = dict(
    model="black-forest-labs/FLUX.1-dev",  # demos/app_flux.py loads FLUX.1-dev in float16
    dtype="float16",
    method="flowchef",
    num_steps=30,
    objective={"space": "latent", "weight": 1000.0, "reduction": "mean"},
    operators=["inpaint_box", "inpaint_freeform"],
    resolution=1024,
    guidance_scale=0.5,  # Flux's distilled guidance: demos/app_flux.py passes guidance_scale=0.5 to pipe.inpaint
    quirks=_quirks("unshifted_unmasked_latent_target", "binary_latent_mask"),
    parity={"options": {"official_quirks": True}, "objective": {"official_quirks": True}},
)
_FLUX_EDIT = dict(
    model="black-forest-labs/FLUX.1-schnell",  # src/flux_edit.py loads FLUX.1-schnell in float16
    dtype="float16",
    method="flowchef_edit",
    num_steps=30,
    objective=None,
    operators=None,
    resolution=1024,
    quirks=_quirks("unshifted_unmasked_latent_target", "binary_latent_mask"),
    parity={"options": {"official_quirks": "flux"}},
)
_SD15 = "src/pipeline_rf_inverseproblems.py, src/instaflow_inverseproblems.py, src/inverse_operators.py, README.md"

PRESETS: dict[str, dict[str, Any]] = {
    "flowchef_pixel_rf": {
        "method": "flowchef",
        "num_steps": 100,
        # the official update is literally x - 500 * g at every step i < N - 1: plain gradient descent ("sgd"
        # without momentum is equal); window (0, -1) is "every step but the last" at any number of steps
        "options": {"optimizer": "gd", "step_size": 500.0, "inner_steps": 1, "window": (0, -1)},
        "objective": {"space": "pixel", "weight": 1.0, "reduction": "mean"},
        "operators": ["inpaint_box:size=20", "sr_avgpool:factor=4", "gaussian_blur:kernel_size=11,sigma=1.0"],
        "resolution": 64,
        "quirks": _quirks("off_centre_blur_kernel", "resampled_measurement_noise"),
        "parity": {"options": {"official_quirks": True},
                   "operators": ["inpaint_box:size=20", "sr_avgpool:factor=4",
                                 "gaussian_blur:kernel_size=11,sigma=1.0,padding=constant,centring=official"]},
        "source": _source("inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py, inverse_operators.py "
                          "and inverseproblems_flowchef.sh",
                          "RF++ 64x64, N 100, mean((A(x0_hat) - y)^2 * mask), x - 500 * grad, K 1, every step but "
                          "the last"),
    },
    "flowchef_sd15_pixel": {
        "method": "flowchef",
        "num_steps": 100,
        "options": {"optimizer": "adam", "step_size": 0.02, "inner_steps": 1, "window": None},
        "objective": {"space": "pixel", "weight": 1000.0, "reduction": "mean"},
        # the official deblurring kernel has 50 taps (even: between pixels, output one pixel larger); 51 is the
        # centred equivalent
        "operators": ["sr_avgpool:factor=4", "gaussian_blur:kernel_size=51,sigma=5.0"],
        "resolution": 512,
        "guidance_scale": 1.0,  # the script passes guidance_scale 0.5: the pipeline runs CFG only above 1
        "quirks": _quirks("off_centre_blur_kernel", "resampled_measurement_noise"),
        "parity": {"options": {"official_quirks": True},
                   "operators": ["sr_avgpool:factor=4",
                                 "gaussian_blur:kernel_size=50,sigma=5.0,padding=constant,centring=official"]},
        "source": _source(_SD15, "2-RF (InstaFlow) from SD1.5, SR x4 / deblur: N 100 (max_steps 100, every step), "
                                 "1000 * MSE through the VAE decoder, Adam re-created every step, lr 0.02, K 1"),
    },
    "flowchef_sd15_latent_inpaint": {
        "method": "flowchef",
        "num_steps": 200,
        "options": {"optimizer": "adam", "step_size": 0.5, "inner_steps": 1, "window": None},
        "objective": {"space": "latent", "weight": 0.001, "reduction": "mean"},
        # a 128 box centred in 512 lies on the latent grid: the official bilinear-then-0.5 mask and the encoded
        # masked image equal flowsteer's area mask and E(A^+ y) here, and SD1.5's VAE has no shift
        "operators": ["inpaint_box:size=128"],
        "resolution": 512,
        "guidance_scale": 1.0,  # the script passes guidance_scale 0.5: the pipeline runs CFG only above 1
        "quirks": {},
        "parity": {"options": {"official_quirks": True}},
        "source": _source(_SD15, "2-RF (InstaFlow) from SD1.5, box inpainting: N 200 (max_steps 200, every step), "
                                 "0.001 * masked latent MSE against the encoded observation, Adam re-created every "
                                 "step, lr 0.5, K 1"),
    },
    "flowchef_flux_latent_inpaint": {
        **_FLUX_INPAINT,
        "options": {"optimizer": "gd", "step_size": 1.0, "inner_steps": 5, "window": None},
        "alternatives": [
            {"options": {"window": (0, 20)},
             "origin": "demos/app_flux.py example 2 (assets/saved_results/20241126_173140): max_steps 20 of 30"},
            {"options": {"inner_steps": 3},
             "origin": "demos/app_flux.py examples 5 and 6 (20241127_025429, 20241126_222257): K 3"},
            {"options": {"inner_steps": 10},
             "origin": "assets/saved_results/20241126_053639, 20241126_173140, 20241127_025429 parameters.json: K 10"},
        ],
        "source": _source("demos/app_flux.py (examples 1 and 2, pipe.inpaint with guidance_scale 0.5) and "
                          "src/fluxcombined.py (FluxPipeline.inpaint)",
                          "Flux.1 dev 1024, N 30, 1000 * masked latent MSE (mean), x - lr * grad with lr 1.0, "
                          "K 5, every step (max_steps 30), distilled guidance 0.5"),
    },
    "flowchef_flux_latent_inpaint_ui_default": {
        **_FLUX_INPAINT,
        "options": {"optimizer": "gd", "step_size": 0.5, "inner_steps": 1, "window": None},
        "source": _source("demos/app_flux.py (slider defaults) and src/fluxcombined.py (FluxPipeline.inpaint)",
                          "Flux.1 dev 1024, N 30, 1000 * masked latent MSE (mean), x - lr * grad with the "
                          "interface's defaults lr 0.5, K 1, max_steps 30 (every step), distilled guidance 0.5"),
    },
    "flowchef_flux_edit": {
        **_FLUX_EDIT,
        "options": {"step_size": 0.6, "inner_steps": 5, "source_steps": 10, "edit_guidance": 4.5,
                    "guidance_scale": 0.0},
        "source": _source("README.md (flux_edit.py command) and src/fluxcombined.py (FluxPipeline.edit, called with "
                          "guidance_scale 0.0 by src/flux_edit.py and demos/app_flux.py)",
                          "FLUX.1-schnell 1024 (demos/app_flux.py edits with FLUX.1-dev), N 30, lr 0.6, K 5, "
                          "source_steps 10, true_cfg 4.5, distilled guidance 0.0, 1000 * latent MSE pulls, plain GD"),
    },
    "flowchef_flux_edit_script_default": {
        **_FLUX_EDIT,
        "options": {"step_size": 0.6, "inner_steps": 4, "source_steps": 10, "edit_guidance": 4.5,
                    "guidance_scale": 0.0},
        "source": _source("src/flux_edit.py (argument defaults) and src/fluxcombined.py (FluxPipeline.edit)",
                          "FLUX.1-schnell 1024, N 30, lr 0.6, K 4 (the README command gives 5), source_steps 10, "
                          "true_cfg 4.5, distilled guidance 0.0, 1000 * latent MSE pulls, plain GD"),
    },
    "flowchef_instaflow_edit": {
        "method": "flowchef_edit",
        "num_steps": 50,
        "options": {"optimizer": "adam", "step_size": 0.5, "inner_steps": 5, "source_steps": 20,
                    "edit_guidance": 2.0, "source_weight": 1e-5},
        "objective": None,
        "operators": None,
        "resolution": 512,
        "quirks": _quirks("unshifted_unmasked_latent_target", "binary_bilinear_edit_mask", "pull_with_source_velocity"),
        "parity": {"options": {"official_quirks": "instaflow"}},
        "source": _source("README.md (instaflow_edit.py command) and src/pipeline_rf_inversionfree_edit.py",
                          "2-RF (InstaFlow) from SD1.5, 512, N 50 (max_steps 50, every step), Adam re-created "
                          "every step, lr 0.5, K 5, source_steps 20, guidance 2.0 inside the mask, "
                          "0.00001 * latent MSE pulls"),
    },
}
