"""Objectives: a per-sample loss on the clean estimate x0_hat, in the space it needs.

An objective declares ``space``: ``"latent"`` losses act on the latent x0_hat directly; ``"pixel"`` losses
act on the decoded image D(x0_hat), so that latent models decode only when an objective asks for it.
``objective(model, z)`` returns the (B,) loss of latents ``z``; methods differentiate it with
:func:`objective_gradient`, never through the flow network.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable
from operator import index as as_index
from typing import Any

import torch
import torch.nn.functional as F

from operators import Operator, as_operator, check_image
from operators.base import image_input, is_pil_or_array, tensor_version
from operators.checks import check_image_range, check_noise_std
from operators.noise import randn_like

__all__ = [
    "Objective", "MeasurementFidelity", "ClassifierObjective", "RewardObjective", "CallableObjective",
    "ResampledNoiseFidelity", "check_reward_finite", "class_names", "count_classes", "objective_gradient", "official_latent_mask",
    "resolve_labels", "reward_values", "transformers_preprocess", "unshifted_latent",
]

SPACES = ("latent", "pixel")


def _per_sample(values: torch.Tensor, reduction: str) -> torch.Tensor:
    flat = values.flatten(1)
    return flat.sum(1) if reduction == "sum" else flat.mean(1)


class Objective:
    """A loss L(x0_hat) per sample. Subclasses implement :meth:`loss` on tensors of their ``space``."""

    space: str = "pixel"

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) loss of images (pixel space) or latents (latent space)."""
        raise NotImplementedError

    def bind(self, model, height: int, width: int) -> None:
        """Check the objective against a model and image size before a run (shapes, labels); may cache."""

    def __call__(self, model, z: torch.Tensor) -> torch.Tensor:
        x = model.decode(z) if self.space == "pixel" else z
        loss = self.loss(x)
        if loss.ndim == 0:
            loss = loss.expand(z.shape[0])
        if loss.shape != (z.shape[0],):
            raise ValueError(f"{type(self).__name__} must return one loss per sample, shape ({z.shape[0]},), "
                             f"got {tuple(loss.shape)}")
        return loss


def objective_gradient(objective: Objective, model, x0_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), ∇_{x0_hat} Σ loss): the gradient reaches the decoder when the objective is in pixel space,
    never the flow network (x0_hat is detached), and no parameter accumulates a ``.grad``."""
    with torch.enable_grad():
        z = x0_hat.detach().requires_grad_(True)
        loss = objective(model, z)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


class MeasurementFidelity(Objective):
    """Data fidelity for y = A(x) + n.

    * pixel space: L(z) = weight · ‖A(D(z)) − y‖² (sum or mean over the measurement);
    * latent space: L(z) = weight · ‖M ⊙ (z − E(A⁺ y))‖², against the encoded observation, with M the
      operator's inpainting mask resized to the latent grid (ones for other operators). This is FlowChef's
      latent-space loss; it needs a linear operator with a pseudo-inverse.

    Args:
        operator: the forward model: an ``operators.Operator``, a spec string (``"sr:factor=4"``), or a callable
            ``fn(x) -> y`` / ``nn.Module`` (wrapped as a function operator, see :func:`operators.as_operator`).
        y: the measurement, shaped like ``operator(x)``: a tensor, or a PIL image / NumPy array as every image is
            taken (:func:`_measurement_tensor`).
        noise_std: the measurement noise (default: the operator's own), used by methods that stop at the
            noise level (FLAIR's discrepancy principle).
        official_quirks: latent space only; True reproduces the target and mask of FlowChef's official Flux
            inpainting (``src/fluxcombined.py``, ``FluxPipeline.inpaint``, FlowChef/FlowChef commit 9b705fc)
            for parity runs: the target is a · E(``unmasked_image``) (:func:`unshifted_latent`) and the mask the
            binary :func:`official_latent_mask`. flowsteer's default, E(A⁺y) with the autoencoder's own shift
            and the area-averaged mask, sees only the measurement and keeps the latent statistics the flow was
            trained on.
        unmasked_image: the complete image (B or 1, C, H, W) in [-1, 1] that the official code encodes; needed
            with ``official_quirks=True`` and refused otherwise.
    """

    def __init__(self, operator: Operator | Any, y: torch.Tensor, space: str = "pixel", weight: float = 1.0,
                 reduction: str = "sum", noise_std: float | None = None, official_quirks: bool = False,
                 unmasked_image: torch.Tensor | None = None):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        operator = as_operator(operator)  # an Operator, a spec string, a callable fn(x) -> y or an nn.Module
        y = _measurement_tensor(operator, y)
        operator.check_measurement(y)  # an image batch, or what the operator measures (a function's (B, m), ...)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("the measurement y contains NaN or infinite values")
        noise_std = operator.noise_std if noise_std is None else check_noise_std(noise_std)
        if space == "latent" and not (operator.is_linear and operator.has_pseudo_inverse):
            raise ValueError(f"latent-space fidelity needs a linear operator with a pseudo-inverse; "
                             f"{type(operator).__name__} has none: use space='pixel'")
        if not isinstance(official_quirks, bool):
            raise ValueError(f"official_quirks must be True or False, got {official_quirks!r}")
        if official_quirks:
            if space != "latent":
                raise ValueError("official_quirks=True reproduces the official latent-space target and mask; use "
                                 "space='latent' (the pixel-space quirks are flowchef(official_quirks=True) and "
                                 "GaussianBlur(centring='official'))")
            if getattr(operator, "missing_for", None) is None:
                raise ValueError(f"official_quirks=True reproduces the official latent inpainting and needs an "
                                 f"inpainting operator with a mask, not {type(operator).__name__}")
            if unmasked_image is None:
                raise ValueError("official_quirks=True encodes the complete image, as the official Flux code does: "
                                 "pass unmasked_image=<the image before masking, (B, C, H, W) in [-1, 1]>")
            check_image(unmasked_image, "unmasked_image")
        elif unmasked_image is not None:
            raise ValueError("unmasked_image is read only with official_quirks=True; drop it (the default target "
                             "is encoded from the measurement alone)")
        self.operator, self.y, self.space, self.weight, self.reduction = operator, y, space, float(weight), reduction
        self.noise_std = float(noise_std)
        self.official_quirks, self.unmasked_image = official_quirks, unmasked_image
        self._target = self._mask = None
        self._bound: tuple | None = None  # what the last bind was for (see bind)

    def _binding(self, model, height: int, width: int) -> tuple | None:
        """What a bind depends on: the model (by identity, with its device and dtype), the size, the space, the
        operator and the measurement y and the complete image (by identity and in-place version); None for a
        model that takes no weak reference (then every bind runs in full)."""
        try:
            reference = weakref.ref(model)
        except TypeError:
            return None
        tensors = tuple(None if t is None else (t, tensor_version(t)) for t in (self.y, self.unmasked_image))
        return (reference, getattr(model, "device", None), getattr(model, "dtype", None), int(height), int(width),
                self.space, self.official_quirks, self.operator, tensors)

    def _bound_to(self, binding: tuple | None) -> bool:
        """True when the last bind was for ``binding`` (tensors compared by identity, not by value)."""
        bound = self._bound
        if binding is None or bound is None or bound[0]() is None or bound[:-1] != binding[:-1]:
            return False
        return all((a is None and b is None) or (a is not None and b is not None and a[0] is b[0] and a[1] == b[1])
                   for a, b in zip(bound[-1], binding[-1]))

    def bind(self, model, height: int, width: int) -> None:
        """Check the measurement against the model and size and, in latent space, encode the target E(A⁺y) (and
        resize the mask). A second bind for the same model (the same object, on the same device and in the same
        dtype), size, operator, measurement and complete image (the same tensors, not edited in place since) costs
        nothing: the checks and the target of the first are kept. Replacing ``y`` or editing it in place binds
        anew; an operator edited in place (a new mask in the same object) needs a new objective."""
        binding = self._binding(model, height, width)
        if self._bound_to(binding):
            return
        self._bind(model, height, width)
        self._bound = binding

    def _bind(self, model, height: int, width: int) -> None:
        probe = torch.zeros(1, model.image_channels, height, width, device=self.y.device, dtype=self.y.dtype)
        expected = tuple(self.operator(probe).shape[1:])
        if tuple(self.y.shape[1:]) != expected:
            raise ValueError(
                f"the measurement has shape {tuple(self.y.shape)} but the operator maps a {height}x{width} image "
                f"with {model.image_channels} channels to (B, {', '.join(map(str, expected))}); measure the image "
                f"with the same operator and size"
            )
        # images are in [-1, 1] on every model but the analytic priors, whose data has its own scale
        if getattr(self.operator, "measures_image_range", False) and getattr(model, "prior", None) is None:
            check_image_range(self.y, "the measurement y", self.noise_std)
        if self.space == "latent" and self.official_quirks:
            if tuple(self.unmasked_image.shape[1:]) != tuple(probe.shape[1:]):
                raise ValueError(f"unmasked_image has shape {tuple(self.unmasked_image.shape)} but the model makes "
                                 f"(B, {', '.join(map(str, probe.shape[1:]))}) images; give the image at that size")
            with torch.no_grad():
                self._target = unshifted_latent(model, self.unmasked_image.to(model.device))
            missing = self.operator.missing_for(probe).to(self._target.device, torch.float32)
            self._mask = official_latent_mask(missing, tuple(self._target.shape[-2:]))
        elif self.space == "latent":
            with torch.no_grad():
                self._target = model.encode(self.operator.pseudo_inverse(self.y).to(model.device))
            mask = getattr(self.operator, "mask_for", None)
            if mask is not None:
                m = mask(probe).to(self._target.device, torch.float32)
                self._mask = F.interpolate(m, size=self._target.shape[-2:], mode="area")
            else:
                self._mask = None

    def residual(self, image: torch.Tensor) -> torch.Tensor:
        """A(x) − y for images x."""
        return self.operator(image) - self.y.to(device=image.device, dtype=image.dtype)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        if self.space == "pixel":
            return self.weight * _per_sample(self.residual(x) ** 2, self.reduction)
        if self._target is None:
            raise ValueError("a latent-space fidelity must be bound to a model first: call objective.bind(model, H, W)")
        diff = x - self._target
        if self._mask is not None:
            diff = diff * self._mask
        return self.weight * _per_sample(diff**2, self.reduction)


def _measurement_tensor(operator: Operator, y: Any) -> Any:
    """A measurement given as a PIL image or NumPy array (diffusers' convention: uint8, or float in [0, 1]) as a
    (B, C, H, W) float32 tensor in [-1, 1] with its own channels (a grey measurement, e.g. colorization's, stays
    one channel), read as :func:`operators.base.image_input` reads images, on the operator's device; a NumPy
    measurement of an operator that measures no image (a function's (B, m) values) as those values in float32.
    Anything else is returned as it is (and checked by the operator)."""
    if isinstance(y, torch.Tensor) or not is_pil_or_array(y):
        return y
    if type(y).__module__ == "numpy" and not operator.measures_image_range:
        return torch.as_tensor(y, dtype=torch.float32)
    where = next((t.device for t in (*operator.parameters(), *operator.buffers())), torch.device("cpu"))
    return image_input(y).to(where)


def unshifted_latent(model, image: torch.Tensor) -> torch.Tensor:
    """a · E(x): the latent without the autoencoder's shift b, as FlowChef's official Flux code encodes its targets
    (``retrieve_latents(vae.encode(image)) * vae.config.scaling_factor`` in ``src/fluxcombined.py``, inpaint and
    edit, FlowChef/FlowChef commit 9b705fc). flowsteer's latents are (E(x) − b) · a, the space the flow model
    samples in, so this is ``model.encode(x) + a · b``; equal to it for autoencoders without a shift (SD1.5)
    and for pixel models."""
    codec = getattr(model, "codec", None)
    autoencoder = getattr(codec, "autoencoder", None)
    config = getattr(autoencoder, "config", None)
    scale = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    scale = 1.0 if scale is None else float(scale)
    shift = 0.0 if shift is None else float(shift)
    return model.encode(image) + scale * shift


def official_latent_mask(missing: torch.Tensor, latent_hw: tuple[int, int], threshold: float = 0.1) -> torch.Tensor:
    """FlowChef's official binary latent mask (1 = pulled toward the target): a latent cell is free when the
    nearest-neighbour sample of the pixel mask ``missing`` (1 = missing / edited) exceeds ``threshold``, pulled
    otherwise: 1 − [nearest(m) > 0.1] (``src/fluxcombined.py``, inpaint and edit, FlowChef/FlowChef commit
    9b705fc). flowsteer weights each cell by the fraction of its pixels that are kept (an area average), which
    reads every pixel of the mask rather than one per cell."""
    m = F.interpolate(missing.float(), size=tuple(latent_hw), mode="nearest")
    return 1.0 - (m > threshold).float()


class ResampledNoiseFidelity(Objective):
    """A :class:`MeasurementFidelity` whose measurement noise is drawn anew at every evaluation, as in FlowChef's
    official loss: L(x) = weight · ‖A(x) + σ n − y‖², n ~ N(0, I) fresh from ``generator`` at each call (the
    official operators add ``torch.randn_like(...) * noise_sigma`` inside ``degradation``, which the loss calls
    on every clean estimate: ``inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py`` and
    ``src/pipeline_rf_inverseproblems.py``, FlowChef/FlowChef commit 9b705fc). flowsteer's fidelity compares
    A(x) with the one measurement y, which is already noisy; the re-sampled noise only adds variance to the
    gradient. For parity runs: :func:`~guidance.methods.flowchef.flowchef` with ``official_quirks=True``.

    Args:
        fidelity: the measurement fidelity (its operator, y, weight, reduction, noise_std and space).
        generator: a torch.Generator, or a list of one per sample, for the noise.
    """

    def __init__(self, fidelity: MeasurementFidelity, generator: torch.Generator | list[torch.Generator]):
        if not isinstance(fidelity, MeasurementFidelity):
            raise ValueError(f"ResampledNoiseFidelity wraps a MeasurementFidelity, got {type(fidelity).__name__}")
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if not generators or not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError("the re-sampled measurement noise needs an explicit generator: pass "
                             "generator=torch.Generator().manual_seed(0) (or a list, one per sample)")
        self.fidelity, self.generator = fidelity, generator
        self.space = fidelity.space

    def bind(self, model, height: int, width: int) -> None:
        self.fidelity.bind(model, height, width)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        if isinstance(self.generator, (list, tuple)) and len(self.generator) > 1:
            if len(self.generator) != like.shape[0]:
                raise ValueError(f"got {len(self.generator)} generators for a batch of {like.shape[0]}; pass one "
                                 f"per sample")
            return torch.cat([randn_like(like[i:i + 1], g) for i, g in enumerate(self.generator)])
        generator = self.generator[0] if isinstance(self.generator, (list, tuple)) else self.generator
        return randn_like(like, generator)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fidelity
        if f.space != "pixel":
            return f.loss(x)
        ax = f.operator(x)
        noisy = ax + f.noise_std * self._noise(ax.detach()) if f.noise_std > 0 else ax
        residual = noisy - f.y.to(device=ax.device, dtype=ax.dtype)
        return f.weight * _per_sample(residual**2, f.reduction)


def transformers_preprocess(processor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The resize and normalisation of a transformers image processor, in torch (differentiable):
    [-1, 1] images -> [0, 1] -> bilinear resize to the processor's size -> (x − mean) / std."""
    size = getattr(processor, "size", None) or {}
    if "height" in size and "width" in size:
        target = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        target = int(size["shortest_edge"])
    else:
        target = None
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    mean = torch.tensor(getattr(processor, "image_mean", [0.5, 0.5, 0.5])).view(1, -1, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", [0.5, 0.5, 0.5])).view(1, -1, 1, 1)
    do_normalize = getattr(processor, "do_normalize", True)

    def preprocess(image: torch.Tensor) -> torch.Tensor:
        x = (image + 1) / 2
        if isinstance(target, tuple):
            x = F.interpolate(x, size=target, mode="bilinear", antialias=True, align_corners=False)
        elif isinstance(target, int):
            h, w = x.shape[-2:]
            scale = target / min(h, w)
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                              align_corners=False)
        if crop:
            ch, cw = int(crop["height"]), int(crop["width"])
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        if do_normalize:
            x = (x - mean.to(x)) / std.to(x)
        return x

    return preprocess


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def class_names(classifier: Any) -> list[str] | None:
    """The class names a classifier carries: ``labels``, ``classes`` or ``names`` (a sequence), or an ``id2label``
    mapping on it, on its ``config`` or on its ``model.config`` (transformers classifiers); None when it has none."""
    for holder in (classifier, getattr(classifier, "model", None)):
        if holder is None:
            continue
        for attribute in ("labels", "classes", "names"):
            names = getattr(holder, attribute, None)
            if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
                return list(names)
        for owner in (holder, getattr(holder, "config", None)):
            id2label = getattr(owner, "id2label", None)
            if isinstance(id2label, dict) and id2label:
                try:
                    return [str(id2label[k]) for k in sorted(id2label, key=int)]
                except (TypeError, ValueError):
                    continue
    return None


def class_index(label: Any, names: list[str] | None) -> int:
    """One class index from an int or a class name (exact, then case-insensitive; a digit string is an index)."""
    if not isinstance(label, str):
        try:
            if isinstance(label, bool):
                raise TypeError
            return as_index(label)
        except TypeError:
            raise ValueError(f"a label must be a class index or a class name, got {label!r}") from None
    text = label.strip()
    if names:
        for candidates, key in ((names, text), ([n.lower() for n in names], text.lower())):
            if key in candidates:
                return candidates.index(key)
    if text.lstrip("-").isdigit():
        return int(text)
    if not names:
        raise ValueError(f"the classifier has no class names (no labels, classes or config.id2label), so the "
                         f"label {text!r} must be a class index: pass a class index (0, 1, ...) instead")
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.5)
    ordered = close + [n for n in names if n not in close]
    shown = ", ".join(map(repr, ordered[:12])) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
    raise ValueError(f"unknown class name {text!r}{hint} The classifier's {len(names)} classes: {shown} (or pass "
                     f"a class index)")


def resolve_labels(label: Any, classifier: Any = None) -> torch.Tensor:
    """The label(s) as a long tensor: an int, a tensor of ints, a class name or a list of names / indices,
    names looked up in :func:`class_names` of ``classifier``."""
    if isinstance(label, torch.Tensor):
        if label.is_floating_point() or label.is_complex():
            raise ValueError(f"label tensors must hold class indices (integers), got dtype {label.dtype}")
        return label.to(torch.long)
    if isinstance(label, str) or isinstance(label, (list, tuple)) and any(isinstance(x, str) for x in label):
        names = class_names(classifier)
        if isinstance(label, str):
            return torch.tensor(class_index(label, names), dtype=torch.long)
        return torch.tensor([class_index(x, names) for x in label], dtype=torch.long)
    try:
        return torch.as_tensor(label, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"the label must be a class index, a tensor of indices or a class name, got "
                         f"{type(label).__name__} {label!r}") from None


class ClassifierObjective(Objective):
    """L = −log p(label | D(z)) for a classifier returning logits (B, num_classes), e.g. a torchvision model
    or a transformers image classifier (its ``.logits`` are used; give ``preprocess`` such as
    :func:`transformers_preprocess(processor)`).

    Args:
        classifier: callable images -> logits.
        label: the target class: an int, a (B,) tensor of classes, a class name (``"hubble"``) or a list of
            names, looked up in the classifier's ``labels`` / ``classes`` or ``config.id2label``.
        preprocess: torch function applied to the [-1, 1] image first (default: none).
        num_classes: the number of classes, when the classifier does not say (``config.num_labels``).
    """

    def __init__(self, classifier: Callable, label: int | str | list | torch.Tensor,
                 preprocess: Callable | None = None, space: str = "pixel", num_classes: int | None = None,
                 weight: float = 1.0):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.classifier, self.preprocess, self.space, self.weight = classifier, preprocess, space, float(weight)
        self.label = resolve_labels(label, classifier)
        config = getattr(classifier, "config", None)
        self.num_classes = num_classes or getattr(config, "num_labels", None)
        if self.num_classes is not None:
            self._check_label(self.num_classes)

    def _check_label(self, num_classes: int) -> None:
        if (self.label < 0).any() or (self.label >= num_classes).any():
            raise ValueError(f"label {self.label.tolist()} is out of range for a classifier with {num_classes} "
                             f"classes: use 0..{num_classes - 1}, or a class name (its labels or config.id2label "
                             f"list them; `flowsteer models` lists the bundled classifiers' names)")

    def bind(self, model, height: int, width: int) -> None:
        """Check the label before a run: when the classifier does not say how many classes it has, one blank image
        of this size is classified to count them (a classifier that fails on it is left to the run to report)."""
        if self.num_classes is not None:
            return
        shape = ((1, model.image_channels, height, width) if self.space == "pixel"
                 else (1, *model.latent_shape(height, width)))
        count = count_classes(lambda x: self.classifier(self.preprocess(x) if self.preprocess else x), shape,
                              model.device)
        if count is not None:
            self._check_label(count)
            self.num_classes = count

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocess(x) if self.preprocess else x
        logits = _logits(self.classifier(inputs))
        if not isinstance(logits, torch.Tensor):
            raise ValueError(f"the classifier returned {_returned(logits)}, but it must return logits, a tensor of "
                             f"shape (B, classes)")
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return logits of shape (B, classes), got {tuple(logits.shape)}")
        if logits.shape[1] != self.num_classes:  # checked once per class count, not at every step
            self._check_label(logits.shape[1])
            self.num_classes = logits.shape[1]
        label = self.label.to(logits.device).expand(x.shape[0])
        return -self.weight * torch.log_softmax(logits.float(), dim=1).gather(1, label[:, None])[:, 0]


def count_classes(classifier: Callable, shape: tuple[int, ...], device: Any = None) -> int | None:
    """How many classes ``classifier`` returns logits for, from one blank input of ``shape``; None when it cannot
    say (it fails on that input, or returns no (1, classes) logits: the run then reports what is wrong)."""
    try:
        with torch.no_grad():
            logits = _logits(classifier(torch.zeros(shape, device=device)))
    except Exception:  # noqa: BLE001 - a probe only
        return None
    return int(logits.shape[1]) if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None


def _returned(value: Any) -> str:
    """What a user function returned, for a message: its type and the start of its repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def reward_values(values: Any, batch: int, name: str = "the reward", item: str = "image") -> torch.Tensor:
    """A reward's output as a real tensor of one score per ``item`` (image, sequence), (``batch``,) (a single
    number: one score for all); a string, a list, a complex or wrongly shaped tensor is refused in one line naming
    what it was."""
    if isinstance(values, torch.Tensor):
        tensor = values
    elif type(values).__module__ == "numpy" and getattr(getattr(values, "dtype", None), "kind", "x") in "biuf":
        tensor = torch.as_tensor(values)
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        tensor = torch.tensor(float(values))
    else:
        raise ValueError(f"{name} returned {_returned(values)}, but a reward must return a tensor (or NumPy array) "
                         f"of one score per {item}, shape ({batch},), higher is better")
    if tensor.is_complex():
        raise ValueError(f"{name} returned a {tensor.dtype} tensor; return real scores, one per {item}")
    if tensor.ndim != 0 and tuple(tensor.shape) != (batch,):
        raise ValueError(f"{name} returned a tensor of shape {tuple(tensor.shape)} for {batch} {item}(s), but a "
                         f"reward returns one score per {item}, shape ({batch},)")
    return tensor


def check_reward_finite(values: torch.Tensor, name: str = "the reward", item: str = "image") -> None:
    """Refuse NaN or infinite scores in one line naming how many (one host read)."""
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        what = "NaN" if bool(torch.isnan(values.detach()).any()) else "infinite scores"
        shown = ", ".join(f"{v:.4g}" for v in values.detach().flatten()[:4].tolist())
        raise ValueError(f"{name} returned {what} for {bad} of {max(1, values.numel())} {item}(s) (scores: "
                         f"{shown}); it must return finite scores: check it on such {item}s (a division by zero, the "
                         f"log of 0 or of a negative number)")


class RewardObjective(Objective):
    """L = −weight · r(D(z)) for a differentiable reward r: images -> (B,) scores (higher is better).

    What r returns is checked (:func:`reward_values`): a tensor, a NumPy array or a number, one finite score per
    image; a string, a wrongly shaped tensor or NaN is refused in one line naming what it returned. NaN is looked
    for at the first call, then at every call whose scores are on the CPU (GPU scores are not read back at every
    step; a NaN that appears later there is caught by the methods' divergence checks). ``name`` is how messages
    call the reward (default: "the reward '<function name>'")."""

    def __init__(self, reward: Callable[[torch.Tensor], torch.Tensor], weight: float = 1.0, space: str = "pixel",
                 name: str | None = None):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if not callable(reward):
            raise ValueError(f"the reward must be a function images -> (B,) scores, got {_returned(reward)}")
        self.reward, self.weight, self.space = reward, float(weight), space
        self.name = name or f"the reward {getattr(reward, '__name__', type(reward).__name__)!r}"
        self._item = "image" if space == "pixel" else "sample"
        self._checked = False

    def scores(self, x: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        """r(x), checked: one score per image (a scalar: one for all), on ``x``'s device."""
        values = reward_values(self.reward(x), x.shape[0], self.name, self._item).to(x.device)
        if check_finite:
            check_reward_finite(values, self.name, self._item)
        return values

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        values = self.scores(x, check_finite=not self._checked or x.device.type == "cpu")
        self._checked = True
        return -self.weight * values


class CallableObjective(Objective):
    """Any user function ``fn(x) -> (B,) loss`` (or a scalar) on images (``space="pixel"``) or latents."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], space: str = "pixel"):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.fn, self.space = fn, space

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
