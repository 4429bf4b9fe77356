"""FLAIR (Erbach et al., "Solving Inverse Problems with FLAIR", NeurIPS 2025).

A variational posterior q(z0 | y) = δ(mu) in latent space. Each step takes one SGD step (learning rate 1,
weight w) on the frozen model's flow-matching loss around mu, evaluated without backpropagating through the
network, then enforces the measurement by a few gradient steps through the decoder (hard data consistency)::

    grid s_1..s_N = linspace(1, s_min, N + 2)[1:-1]            (no shift; never below s_min)
    mu = E(A⁺ y),  eps_hat ~ N(0, I)
    for s in grid:
        w   = CRW(s)                                            calibrated regularization weight
        eps = a eps_hat + sqrt(1 - a²) z,  a = 1 - s,  z ~ N(0, I)     deterministic trajectory adjustment
        x_s = s eps + (1 - s) mu
        v   = v_theta(x_s, s, c)                                no grad
        eps_hat = x_s + (1 - s) v
        mu  = mu - w (v - (eps - mu))                           = mu + (w / s)(x0_hat - mu)
        repeat up to data_steps times:
            L = ‖A(D(mu)) - y‖²;  stop if L < σ_n² · m           discrepancy principle (m: measured entries)
            mu = mu - data_lr · w · ∇_mu L                      gradient through the decoder only
    return D(mu)
"""

from __future__ import annotations

import math
import warnings

import torch
from tqdm.auto import tqdm

from operators.base import measured_entries, operator_gain
from operators.checks import MAX_STEPS, check_work

from ..features.calibration import CRWTable, resolve_crw
from ..flow import eps_from_velocity, x0_from_velocity
from ..objectives import MeasurementFidelity
from ..sampler import initial_noise, start_state, step_end
from .common import (CountingModel, DivergenceMonitor, MethodResult, check_count, check_flag, check_nonnegative,
                     initial_image, is_pixel_model, reference_scale)

__all__ = ["flair", "flair_grid", "dta_noise", "regularizer_step", "data_consistency", "initial_image",
           "default_data_lr", "operator_gain", "sr_data_lr", "PRESETS"]

DEFAULT_DATA_LR = 0.1  # the paper's data learning rate for inpainting and motion deblurring (SD3.5 latents)
PIXEL_STEP_FRACTION = 0.9  # pixel-space models: fraction of the data step's stability limit at the largest w


def flair_grid(num_steps: int, sigma_min: float) -> torch.Tensor:
    """FLAIR's times s_1..s_N = linspace(1, s_min, N + 2)[1:-1] (float64): uniform, no shift, endpoints excluded."""
    return torch.linspace(1.0, sigma_min, num_steps + 2, dtype=torch.float64)[1:-1]


def dta_noise(eps_hat: torch.Tensor, z: torch.Tensor, sigma: float, dta: bool = True) -> torch.Tensor:
    """Deterministic trajectory adjustment: eps = a · eps_hat + sqrt(1 − a²) · z with a = 1 − s (a = 0 without
    DTA: fresh noise). A unit-variance mix of the previous noise estimate and fresh noise."""
    a = 1.0 - float(sigma) if dta else 0.0
    return a * eps_hat + math.sqrt(max(0.0, 1.0 - a * a)) * z


def regularizer_step(mu: torch.Tensor, v: torch.Tensor, eps: torch.Tensor, weight: float) -> torch.Tensor:
    """One SGD step (learning rate 1) of weight w on the flow-matching loss ‖v − (eps − mu)‖² around mu, the
    velocity held fixed: mu − w (v − (eps − mu)), which equals mu + (w / s)(x0_hat − mu) for
    x_s = s eps + (1 − s) mu and x0_hat = x_s − s v."""
    return mu - weight * (v - (eps - mu))


def default_data_lr(operator, image_shape: tuple[int, ...], pixel_space: bool, max_weight: float,
                    device: torch.device | str = "cpu") -> float:
    """The data learning rate when none is given, from ‖A‖² (:func:`operator_gain`) and the largest CRW weight
    w_max the run will use. A data step moves mu by data_lr · w · ∇L with ∇L = 2 Jᵀ Aᵀ r (J: the decoder's
    Jacobian), so along A's top direction it contracts the residual by 1 − 2 · data_lr · w · ‖A J‖².

    * latent models: the paper's rule 0.1 / ‖A‖² — its 0.1 for inpainting and motion deblurring (‖A‖ = 1) and
      ≈ 0.1 · f² for SR×f (the paper: 12 at ×12, i.e. f² / 12; the presets carry the exact values). The
      decoder's gain ‖J‖² is absorbed in the 0.1 the authors tuned for SD3.5.
    * pixel-space models (J = I): 0.9 / (w_max ‖A‖²), so that the largest data step uses 90% of the stability
      limit 2 · data_lr · w · ‖A‖² < 2. The paper's 0.1 would contract the residual by only 1 − 0.2 w per
      iteration there, too slowly to reach the noise level within 15 iterations.
    """
    gain = operator_gain(operator, image_shape, device)
    if pixel_space:
        return PIXEL_STEP_FRACTION / (max(max_weight, 1e-6) * gain)
    return DEFAULT_DATA_LR / gain


def _image_size(operator, y: torch.Tensor) -> tuple[int, int]:
    """The image size A⁺ maps the measurement to (y's own size for nonlinear operators with image measurements);
    a ValueError asking for height and width where the measurement does not tell it."""
    if getattr(operator, "is_linear", False):
        shape = operator.input_shape(tuple(y.shape))
    elif y.ndim == 4:
        shape = tuple(y.shape)
    else:
        raise ValueError(f"the measurement of shape {tuple(y.shape)} is not an image, so it does not tell the "
                         f"image size; pass height= and width=")
    return int(shape[-2]), int(shape[-1])


def _data_loss(model, objective: MeasurementFidelity, mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) L = ‖A(D(mu)) − y‖² (sum of squares over the measurement)."""
    return (objective.operator(model.decode(mu)) - y).square().flatten(1).sum(1)


def data_consistency(model, objective, mu, y, step_size, max_steps, threshold, stop_rtol: float = 0.0):
    """FLAIR's hard data consistency: up to ``max_steps`` gradient steps mu ← mu − step_size · ∇_mu L with
    L = ‖A(D(mu)) − y‖², the gradient through the decoder only. Before each step the samples whose L is already
    below ``threshold`` (σ_n² · (measured entries of y), the discrepancy principle) stop; with ``stop_rtol`` > 0
    so do those whose last step lowered L by less than that share of it, decided from the losses already known,
    before the next graph is built; the loop ends when all have stopped.

    Returns (mu, steps (B,) taken per sample, L (B,) at the last check; NaN when ``max_steps`` is 0)."""
    steps = torch.zeros(mu.shape[0], dtype=torch.long, device=mu.device)
    loss = previous = None
    going = torch.ones(mu.shape[0], dtype=torch.bool, device=mu.device)  # not stopped by the relative rule
    for _ in range(max_steps):
        if stop_rtol > 0 and previous is not None:
            going = going & (previous - loss > stop_rtol * previous)
            if not bool(going.any()):  # the relative rule, before any graph: one host read per iteration
                break
        with torch.enable_grad():
            z = mu.detach().requires_grad_(True)
            previous, loss = loss, _data_loss(model, objective, z, y)
            active = (loss >= threshold) & going
            if not bool(active.any()):  # the one host synchronisation per iteration
                break
            (grad,) = torch.autograd.grad(loss.sum(), z)
        loss = loss.detach()
        mask = active.to(mu.dtype).reshape(-1, *([1] * (mu.ndim - 1)))
        mu = mu - step_size * mask * grad
        steps += active.long()
    if loss is None:
        loss = torch.full((mu.shape[0],), float("nan"), device=mu.device)
    return mu, steps, loss.detach()


@torch.no_grad()
def flair(model, objective: MeasurementFidelity, *, num_steps: int = 50, cond=None, height=None, width=None,
          generator=None, callback=None, progress: bool = True, batch_size=None, latents=None, decode: bool = True,
          on_step_end=None,
          sigma_min: float = 0.18, data_steps: int = 15, data_lr: float | None = None,
          crw: CRWTable | str | float | None = None, dta: bool = True, check_divergence: bool = True,
          crw_cache_dir: str | None = None, data_stop_rtol: float = 0.0) -> MethodResult:
    """Solve the inverse problem of ``objective`` with FLAIR (see the module docstring for the algorithm).

    Args:
        objective: a :class:`~guidance.objectives.MeasurementFidelity` in pixel space; FLAIR uses its operator,
            measurement and noise level. The data term is always the plain sum of squares ‖A(D(mu)) − y‖² (the
            discrepancy threshold σ_n² · m, m the measured entries of y, and the official step sizes are defined
            for it), whatever the
            objective's weight and reduction.
        num_steps: N, the number of network evaluations (each doubled inside the model with CFG).
        cond: the condition; the paper uses CFG scale 2 with an empty negative prompt for SD3.5
            (``model.condition(prompt, "", 2.0)``, see ``PRESETS``).
        height, width: image size; default: the size A⁺ maps the measurement to.
        generator: source of eps_hat and of the fresh noise z of every step (a list: one per sample).
        callback: called after each step with ``{"step", "sigma", "x": mu, "x_s", "x0_hat", "weight",
            "data_steps"}``.
        batch_size: number of restorations; default: the measurement's batch (a batch-1 y is shared).
        latents: the initial noise estimate eps_hat instead of a fresh draw.
        sigma_min: s_min of the grid, in (0, 1).
        data_steps: the most data-consistency steps per time step (0: none).
        data_lr: learning rate of the data steps (each step is data_lr · w · ∇L). None: :func:`default_data_lr`
            — the paper's 0.1 / ‖A‖² for latent models (0.1 for inpainting and deblurring, 0.1·f² for SR×f),
            0.9 / (w_max ‖A‖²) for pixel-space models. The presets carry the paper's exact values.
        crw: the regularization weights: a :class:`~guidance.features.calibration.CRWTable`, the name of an official
            table ("sd3.5-medium", "sd3.5-large"), a path to a saved one, a constant weight, or None: the model's
            cached calibration (:func:`guidance.features.calibration.load_crw`), else the official table for
            SD3.5-medium or -large at CFG scale 2, else :data:`~guidance.features.calibration.DEFAULT_CRW` with a
            warning that calibration is advised (:func:`guidance.features.calibration.resolve_crw`).
        dta: deterministic trajectory adjustment (a = 1 − s); False draws fresh noise each step (a = 0).
        check_divergence: stop with a DivergenceError naming the step and mu's scale when mu becomes NaN or
            infinite or a sample's RMS exceeds ``DIVERGENCE_FACTOR`` (100) times its reference scale, the larger of
            1 and the RMS of the starting mu = E(A⁺y), of the starting noise and of the model's data where known
            (:func:`~guidance.methods.common.reference_scale`): mu is a clean latent, whose RMS stays near that of
            E(A⁺y). Checked after every step.
        crw_cache_dir: where automatic lookup searches for calibrated tables (default as in calibration).
        data_stop_rtol: 0 (default) keeps the paper's stopping rule, the discrepancy principle alone, which never
            fires for a noiseless measurement (every data step then runs); a share in (0, 1) also stops a sample's
            data steps once a step lowers L by less than that share of it (e.g. 0.01), decided before the next
            step builds its graph.

    Returns:
        MethodResult with x = mu, image = D(mu), nfe = N (a CFG call counts once), sigmas = the grid, and info:
        ``weights`` (w per step), ``data_steps`` (N, B) iterations taken per step and sample, ``data_loss``
        (N, B) L at the last check, ``data_lr``, ``threshold`` (σ_n² · m, m the entries of y the operator
        measures: :func:`operators.base.measured_entries`), ``crw`` (the table),
        ``crw_origin`` ("given", "constant", "cache", "default" or the path) and ``initial_image`` (A⁺y).
    """
    if not isinstance(objective, MeasurementFidelity):
        raise ValueError(f"flair needs a MeasurementFidelity objective (an operator, a measurement and its noise "
                         f"level), got {type(objective).__name__}; build one with MeasurementFidelity(operator, y)")
    if objective.space != "pixel":
        raise ValueError("FLAIR enforces the measurement in pixel space, ‖A(D(mu)) − y‖²; build the objective "
                         "with space='pixel'")
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)) or not 0 < sigma_min < 1:
        raise ValueError(f"sigma_min must be a number in (0, 1) (the paper uses 0.18), got {sigma_min!r}")
    check_count(data_steps, "data_steps")
    if data_lr is not None:
        check_nonnegative(data_lr, "data_lr")
    check_flag(dta, "dta")
    if isinstance(data_stop_rtol, bool) or not isinstance(data_stop_rtol, (int, float)) \
            or not 0 <= data_stop_rtol < 1:
        raise ValueError(f"data_stop_rtol must be a share in [0, 1) (0: the paper's rule alone; e.g. 0.01), got "
                         f"{data_stop_rtol!r}")
    if data_stop_rtol and not data_steps:
        raise ValueError(f"data_stop_rtol={data_stop_rtol} stops data steps, but data_steps=0 runs none: drop it or "
                         f"give data_steps")
    operator = objective.operator
    y_batch = objective.y.shape[0]
    if height is None and width is None and latents is None:
        height, width = _image_size(operator, objective.y)
    check_count(num_steps, "num_steps", 1, MAX_STEPS)
    check_work({"num_steps": num_steps, "data_steps": data_steps}, "flair")
    state = start_state(model, cond, num_steps, height, width, generator,
                        batch_size or (None if latents is not None else y_batch), latents)
    objective.bind(model, state.height, state.width)
    eps_hat, cond = state.x, state.cond
    batch, device = eps_hat.shape[0], eps_hat.device
    if y_batch not in (1, batch):
        raise ValueError(f"the measurement has batch {y_batch} but {batch} restorations were asked for; "
                         f"give one measurement per restoration or a single one to share")
    table, origin = resolve_crw(crw, model, cond, state.height, state.width, crw_cache_dir)
    if origin == "default":
        warnings.warn(f"no calibrated regularization weights (CRW) for {type(model).__name__} at this guidance "
                      f"setting and size: FLAIR uses the default table (SD3.5-medium's shape at 2/3 strength). "
                      f"Calibration is advised: guidance.calibrate(model, clean_images, "
                      f"cond) measures and caches a table; or pass crw=... explicitly.", UserWarning, stacklevel=3)

    y = objective.y.to(device=device, dtype=torch.float32)
    image_shape = (batch, model.image_channels, state.height, state.width)
    init = initial_image(operator, y, image_shape).float().clamp(-1, 1).expand(*image_shape)
    grid = flair_grid(num_steps, float(sigma_min))
    weights = [table(s) for s in grid.tolist()]
    if data_lr is None:
        data_lr = default_data_lr(operator, image_shape, is_pixel_model(model), max(weights), device)
    threshold = objective.noise_std ** 2 * float(measured_entries(operator, image_shape, device))

    counted = CountingModel(model)
    mu = model.encode(init.contiguous()).float()
    step_counts, losses = [], []
    hint = f"use a smaller data_lr than {data_lr:.3g} or fewer data_steps"
    monitor = DivergenceMonitor("flair", hint, check_divergence, reference_scale(model, mu, eps_hat))
    for i in tqdm(range(num_steps), disable=not progress, desc="FLAIR"):
        s, w = float(grid[i]), weights[i]
        eps = dta_noise(eps_hat, initial_noise(tuple(mu.shape), generator, device), s, dta)
        x_s = s * eps + (1 - s) * mu
        v = counted.velocity(x_s, s, cond)
        eps_hat = eps_from_velocity(x_s, v, s)
        mu = regularizer_step(mu, v, eps, w)
        mu, steps, loss = data_consistency(model, objective, mu, y, data_lr * w, data_steps, threshold,
                                           float(data_stop_rtol))
        monitor.update(mu, i)
        monitor.check()  # the data steps read the device every iteration anyway
        step_counts.append(steps)
        losses.append(loss)
        if callback is not None:
            callback({"step": i, "sigma": s, "x": mu, "x_s": x_s, "x0_hat": x0_from_velocity(x_s, v, s),
                      "weight": w, "data_steps": steps})
        mu = step_end(on_step_end, i, s, s, {"x": mu})  # the state is the variational mean
    monitor.finish()
    image = model.decode(mu) if decode else None
    info = {"weights": weights, "data_steps": torch.stack(step_counts).cpu(), "data_loss": torch.stack(losses).cpu(),
            "data_lr": float(data_lr), "threshold": threshold, "crw": table, "crw_origin": origin,
            "initial_image": init}
    return MethodResult(x=mu, image=image, nfe=counted.nfe, sigmas=grid.float(), info=info)


# The official configurations: prs-eth/FLAIR at commit c4f55f7 (Erbach et al., "Solving Inverse Problems with
# FLAIR", NeurIPS 2025), configs/x12.yaml, configs/inpainting.yaml and configs/motion_deblur.yaml, run by
# inference_scripts/run_image_inv.py: SD3.5-medium in bfloat16 with TAESD3 ("madebyollin/taesd3", use_tiny_ae)
# as both encoder and decoder, 768² images, 50 steps on linspace(1, 0.18, 52)[1:-1] (n_steps, ts_min), DTA
# (inv_alpha 1-t), the regulariser as one SGD step of learning rate 1 weighted by the official CRW table
# (optimized_reg_weight, regularizer_weight 0.5), up to 15 data steps (likelihood_steps) of SGD with the data
# learning rate times the same weight (likelihood_weight_mode reg_weight), stopped below 1e-4 · y.numel()
# (early_stopping; their inpainting y = x[mask] holds the kept entries only, so this is σ_n² · m, m the measured
# entries, for the measurement noise std 0.01), CFG scale 2 with the empty negative
# prompt. The official seeds seed torch's global generator once per run (CUDA streams flowsteer cannot reproduce
# draw for draw); the presets carry them as the runs' base seeds.
OFFICIAL_SOURCE = ("Erbach et al., Solving Inverse Problems with FLAIR (NeurIPS 2025); prs-eth/FLAIR at commit "
                   "c4f55f775c307663d7ef73b2bf0639fa7129e14e")
FACE_PROMPT = "a high quality photo of a face"  # the FFHQ prompt of the official README
CAPTION_PROMPT = "a high quality photo of"  # DIV2K: followed by each image's caption (configs/x12.yaml "prompt")


def _preset(config: str, operators: list[str], data_lr: float, prompt: str, seed: int, **extra) -> dict:
    """A FLAIR parity preset for the official ``config`` file (see above). ``prompt`` is the whole prompt, or the
    prefix of each image's caption when a benchmark is given captions ("<prompt> <caption>", as
    src/flair/utils/data_utils.py joins them)."""
    return {"method": "flair", "num_steps": 50,
            "options": {"sigma_min": 0.18, "data_steps": 15, "data_lr": data_lr, "dta": True, "crw": "sd3.5-medium"},
            "objective": {"space": "pixel", "reduction": "sum"}, "operators": operators, "noise_std": 0.01,
            "guidance_scale": 2.0, "negative_prompt": "", "prompt": prompt, "seed": seed, "resolution": 768,
            "model": "stabilityai/stable-diffusion-3.5-medium", "dtype": "bfloat16",
            "decoder": "madebyollin/taesd3", "encoder": "madebyollin/taesd3",
            "source": f"{OFFICIAL_SOURCE}, {config}", **extra}


def sr_data_lr(factor: int) -> float:
    """The official SR step size 12 at ×12 (configs/x12.yaml, optimizer_dataterm lr), carried to other factors as
    12 · f² / 144 (the data gradient of SR×f shrinks like 1/f²)."""
    return 12.0 * factor**2 / 144.0


PRESETS = {
    # bicubic SR ×12 with the official half-sample (symmetric) border rule, DIV2K captions after the prompt
    "flair_sr12": _preset("configs/x12.yaml", ["sr:factor=12,padding=symmetric"], sr_data_lr(12), CAPTION_PROMPT,
                          3),
    "flair_sr4": _preset("configs/x12.yaml", ["sr:factor=4,padding=symmetric"], sr_data_lr(4), CAPTION_PROMPT, 3,
                         note="data_lr from the SR×f rule 12·f²/144; the official configurations publish SR×12 only"),
    # the box of configs/inpainting.yaml: rows 128:640, columns 384:640 at 768² (22.2 % missing); FFHQ prompt
    "flair_inpaint": _preset("configs/inpainting.yaml", ["inpaint_box:layout=flair"], 0.1, FACE_PROMPT, 42,
                             note="the configuration's own prompt names its example image (\"A high quality photo "
                                  "of a girl with a pirate eye-patch.\"); the README's FFHQ prompt is used"),
    # the free-form mask of DIV2k_mask.npy (README: --mask_file DIV2k_mask.npy), DIV2K captions after the prompt
    "flair_inpaint_div2k": _preset("configs/inpainting.yaml and DIV2k_mask.npy", ["inpaint_mask:name=flair_div2k"],
                                   0.1, CAPTION_PROMPT, 42),
    # random camera-shake kernels of size 61, intensity 0.5, from the vendored generator seeded with 42
    "flair_motion_deblur": _preset(
        "configs/motion_deblur.yaml", ["motion_blur:kernel_size=61,intensity=0.5,generator=official,seed=42"], 0.1,
        FACE_PROMPT, 42,
        note="configs/motion_deblur.yaml names the weight table SD3_loss_v_norm_div2k_squared.npy, which the "
             "repository does not contain; the SD3.5-medium table of the other configurations is used"),
}
