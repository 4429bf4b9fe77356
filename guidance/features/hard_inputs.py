"""Straight-through guidance for objectives that need a hard (non-differentiable) input.

An 8-bit quantised image, a thresholded mask or an argmax class decision have zero or no gradient, so a
loss L(hard(x)) cannot steer a sampler. The straight-through estimator (as used for guidance by Tang et al.,
"Gumbel-Softmax Flow Matching with Straight-Through Guidance") runs the forward pass on the hard value and the
backward pass through a soft surrogate::

    h_st = soft(x) + (hard(x) − soft(x)).detach()      value hard(x), gradient ∂soft/∂x
         (computed as hard(x) + (soft(x) − soft(x).detach()), so that the value is hard(x) exactly)
    ∂L/∂x ≈ ∂L/∂h |_{h = hard(x)} · ∂soft/∂x

Since FlowChef differentiates only the objective on the clean estimate, L(x0_hat) = loss(hard(D(x0_hat)))
guides the flow toward a low loss of the hard value itself (e.g. of the image a PNG would store).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch

from ..objectives import SPACES, ClassifierObjective, Objective, _logits

__all__ = [
    "HARD_FUNCTIONS", "DecisionObjective", "HardInputObjective", "argmax_decision", "get_hard_function",
    "hard_function", "quantize", "straight_through", "threshold",
]


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """The value of ``hard`` with the gradient of ``soft``: hard.detach() + (soft − soft.detach()), which is
    soft + (hard − soft).detach() but keeps the value of ``hard`` bit for bit (no rounding in hard − soft)."""
    if hard.shape != soft.shape:
        raise ValueError(f"straight_through needs hard and soft values of the same shape, got {tuple(hard.shape)} "
                         f"and {tuple(soft.shape)}; the hard step must not change the shape")
    return hard.detach().to(soft.dtype) + (soft - soft.detach())


def _straight(fn: Callable) -> Callable:
    fn.straight_through = True  # get_hard_function uses it as is (no extra identity wrapping)
    return fn


@_straight
def quantize(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The values a ``bits``-bit image file holds, n = 2^bits − 1: round((x + 1)/2 · n) / n · 2 − 1 for x in
    [-1, 1] (clamped first); gradient of clamp(x, −1, 1): identity inside the range."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    levels = 2**bits - 1
    soft = x.clamp(-1, 1)
    hard = ((soft.detach().float() + 1) * (levels / 2)).round() / levels * 2 - 1  # as tasks.outputs.image_io does
    return straight_through(hard, soft)


@_straight
def threshold(x: torch.Tensor, level: float = 0.0, temperature: float | None = None) -> torch.Tensor:
    """Hard mask 1[x > level] (0/1 floats); gradient of sigmoid((x − level)/temperature), or identity when
    ``temperature`` is None."""
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or None for an identity gradient), got {temperature!r}")
    hard = (x.detach() > level).to(x.dtype)
    return straight_through(hard, x if temperature is None else torch.sigmoid((x - level) / temperature))


@_straight
def argmax_decision(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hard one-hot of argmax over dim 1 (classes, e.g. (B, C)); gradient of softmax(logits/temperature)."""
    if logits.ndim < 2:
        raise ValueError(f"argmax_decision needs logits with classes on dim 1, e.g. (B, C), got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    soft = torch.softmax(logits / temperature, dim=1)
    hard = torch.zeros_like(soft).scatter_(1, logits.detach().argmax(1, keepdim=True), 1.0)
    return straight_through(hard, soft)


def hard_function(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Any function (non-differentiable, through numpy or PIL, e.g. a JPEG round trip) as a straight-through
    step: value fn(x) computed without autograd on the detached input, gradient identity."""
    if not callable(fn):
        raise ValueError(f"hard_function needs a callable, got {type(fn).__name__}")  # noqa: TRY004

    def hard(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = fn(x.detach())
        name = getattr(fn, "__name__", type(fn).__name__)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"hard function {name} must return a tensor of the input's shape {tuple(x.shape)}, "
                             f"got {got}; straight-through needs hard and soft values of the same shape")
        if torch.isnan(out).any():
            raise ValueError(f"hard function {name} returned NaN values")
        return straight_through(out.to(x.device), x)

    hard.__name__ = f"hard_function({getattr(fn, '__name__', type(fn).__name__)})"
    return _straight(hard)


HARD_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "quantize": quantize, "threshold": threshold, "argmax_decision": argmax_decision,
}


def _value(text: str):
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def get_hard_function(spec: str | Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """A straight-through hard step from a name (``"quantize"``), a name with options
    (``"quantize:bits=4"``, ``"threshold:level=0.2,temperature=0.1"``) or a callable. The functions of this
    module are used as is; any other callable is a black-box step, wrapped with :func:`hard_function`."""
    if callable(spec):
        return spec if getattr(spec, "straight_through", False) else hard_function(spec)
    if not isinstance(spec, str):
        raise ValueError(  # noqa: TRY004
            f"a hard step must be a name such as 'quantize' or a callable, got {type(spec).__name__}")
    name, _, options = spec.strip().partition(":")
    name = name.strip()
    if name not in HARD_FUNCTIONS:
        close = difflib.get_close_matches(name, HARD_FUNCTIONS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown hard function {name!r}{hint} Available: {', '.join(HARD_FUNCTIONS)}")
    fn = HARD_FUNCTIONS[name]
    accepted = list(inspect.signature(fn).parameters)[1:]
    kwargs = {}
    for part in filter(str.strip, options.split(",")):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or key not in accepted:
            raise ValueError(f"bad option {part.strip()!r} in {spec!r}: {name} takes key=value options among "
                             f"{', '.join(accepted)}")
        kwargs[key] = _value(value)
    if not kwargs:
        return fn
    fn(torch.zeros(1, 2), **kwargs)  # validate the options now, not in the middle of a run
    return _straight(lambda x: fn(x, **kwargs))


class HardInputObjective(Objective):
    """L(x) = loss(hard(x)) with a straight-through hard step: the value is the loss of the hard input, the
    gradient ∂loss/∂h at h = hard(x) passed back through the step's soft surrogate.

    Args:
        loss: differentiable callable on the hard input returning (B,) losses (or a scalar).
        hard: a hard step for :func:`get_hard_function` (name, "name:key=value" or callable).
        space: "pixel" (decoded images) or "latent".
    """

    def __init__(self, loss: Callable[[torch.Tensor], torch.Tensor], hard: str | Callable = "quantize",
                 space: str = "pixel"):
        if not callable(loss):
            raise ValueError(f"loss must be a callable on the hard input returning (B,) losses, "  # noqa: TRY004
                             f"got {type(loss).__name__}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.fn, self.hard, self.space = loss, get_hard_function(hard), space

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hard(x)
        out = self.fn(h)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the loss must return a tensor of (B,) losses, got {type(out).__name__}")  # noqa: TRY004
        if h.requires_grad and not out.requires_grad:
            raise ValueError("the loss is not differentiable in its hard input (its result carries no gradient): "
                             "straight-through needs a loss differentiable in the hard input; put non-differentiable "
                             "steps (rounding, numpy, PIL) in hard= instead, e.g. hard=hard_function(fn)")
        return out

    @torch.no_grad()
    def raw_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The honest value loss(hard(x)), without autograd (for reporting)."""
        return self.fn(self.hard(x.detach())).detach()


class DecisionObjective(ClassifierObjective):
    """L = −weight · onehot(argmax logits)[label]: −1 where the classifier's hard decision is ``label``, 0
    elsewhere; the gradient is that of −softmax(logits/temperature)[label] (straight-through).

    Args as :class:`~guidance.objectives.ClassifierObjective`, plus ``temperature`` of the surrogate softmax.
    """

    def __init__(self, classifier: Callable, label: int | torch.Tensor, preprocess: Callable | None = None,
                 temperature: float = 1.0, space: str = "pixel", num_classes: int | None = None, weight: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        super().__init__(classifier, label, preprocess, space, num_classes, weight)
        self.temperature = float(temperature)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        logits = _logits(self.classifier(self.preprocess(x) if self.preprocess else x))
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"the classifier must return logits of shape (B, classes), got {tuple(logits.shape)}")
        self._check_label(logits.shape[1])
        label = self.label.to(logits.device).expand(x.shape[0])
        decision = argmax_decision(logits.float(), self.temperature)
        return -self.weight * decision.gather(1, label[:, None])[:, 0]
