"""The rules every input is checked by, one function per kind of value, shared by the command line and the Python
API of the whole toolkit (operators are its lowest layer, so ``guidance`` and ``tasks`` take them from here).

Each refusal is one ``ValueError`` line that names the value, the problem and what to do instead. Counts are
bounded: a count beyond its bound is a typo, not a request, and refusing it before anything runs is what keeps
every loop finite (:data:`MAX_STEPS`, :data:`MAX_ITERATIONS`, :data:`MAX_BATCH`, and :data:`MAX_WORK` for
their products, see :func:`check_work`).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["MAX_BATCH", "MAX_ITERATIONS", "MAX_NOISE_STD", "MAX_SEED", "MAX_STEPS", "MAX_WORK", "RANGE_MARGIN",
           "check_flag", "check_generator", "check_image_range", "check_int", "check_noise_std", "check_number",
           "check_seed", "check_work"]

#: the most time steps of one schedule (a sampler's or a method's num_steps)
MAX_STEPS = 10_000
#: the most iterations of an inner loop (per time step, or of one refinement such as pixel consistency)
MAX_ITERATIONS = 10_000
#: the most images (or particles, candidates, samples) one call makes at once, or one command makes in all
MAX_BATCH = 4096
#: the most loop iterations one call runs in all: the product of its nested counts (steps x inner iterations
#: x images), about a day of network evaluations for the smallest model on a CPU
MAX_WORK = 10_000_000
#: the largest Gaussian noise std taken, in [-1, 1] image units: beyond it the noise drowns any image (its whole
#: range is 2) and no method can restore it; a larger value is a unit mistake (e.g. a std given in 0-255 units)
MAX_NOISE_STD = 2.0
#: how far outside [-1, 1] (beyond the noise) an image or a measurement of one may reach: resampling filters
#: overshoot a little (Keys bicubic by about 0.1); 0-255 or other scales are far beyond
RANGE_MARGIN = 0.5
#: seeds are integers in 0 .. MAX_SEED (torch.Generator.manual_seed takes 64 bits; 63 leave room for seed + i)
MAX_SEED = 2**63 - 1


def _kind(value) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float)) else repr(value)


def check_int(value, name: str, minimum: int = 0, maximum: int | None = MAX_ITERATIONS, fix: str = "") -> int:
    """``value`` as an int when it is an integer in ``minimum .. maximum`` (None: no upper bound); a bool, a float
    (even 1e9, which the command line reads as a float) or anything else is refused, naming ``name`` and ending
    with ``fix`` when given."""
    tail = f"; {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        whole = isinstance(value, float) and math.isfinite(value) and value == int(value)
        hint = f" (write it as the integer {int(value)})" if whole else ""
        raise ValueError(f"{name} must be an integer >= {minimum}, got {_kind(value)}{hint}{tail}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}{tail}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is more than one run takes (at most {maximum}); use {name} <= {maximum}"
                         f"{tail}")
    return value


def check_work(counts: dict[str, int], what: str = "this run", limit: int = MAX_WORK) -> int:
    """The product of nested loop ``counts`` ({"num_steps": 28, "inner_steps": 5, ...}), refused in one line
    naming them when above ``limit``, before any of them runs."""
    total = math.prod(max(1, int(c)) for c in counts.values())
    if total > limit:
        named = " x ".join(f"{n}={c}" for n, c in counts.items())
        raise ValueError(f"{what} would run {named} = {total:,} iterations, more than one call takes "
                         f"({limit:,}); lower one of them")
    return total


def check_number(value, name: str, minimum: float | None = None, maximum: float | None = None,
                 strict_minimum: bool = False, fix: str = "") -> float:
    """``value`` as a float when it is a finite real number (not a bool) within the bounds (``strict_minimum``:
    above ``minimum``); else a one-line ValueError."""
    tail = f"; {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {_kind(value)}{tail}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise ValueError(f"{name} must be a number {'>' if strict_minimum else '>='} {minimum:g}, got {value:g}{tail}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be a number <= {maximum:g}, got {value:g}{tail}")
    return value


def check_flag(value, name: str) -> bool:
    """True or False only (no truthy text or numbers: ``"maybe"`` is refused, not taken as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_kind(value)}")
    return value


def check_seed(seed, name: str = "seed") -> int:
    """A seed is an integer in 0 .. :data:`MAX_SEED`."""
    fix = f"seeds are integers in 0 .. {MAX_SEED}, such as 0 or 1234"
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name}={seed} is outside the seeds a torch.Generator takes; {fix}")
    return check_int(seed, name, 0, MAX_SEED, fix=fix)


def check_generator(generator, batch: int | None = None, name: str = "generator") -> None:
    """None, a ``torch.Generator`` or a list of them (one per sample: ``batch`` of them when given); anything else
    is refused in one line."""
    many = isinstance(generator, (list, tuple))
    for g in generator if many else [generator]:
        if g is not None and not isinstance(g, torch.Generator):
            raise ValueError(f"{name} must be a torch.Generator (torch.Generator().manual_seed(0)), a list of them "
                             f"or None, got {type(g).__name__} {g!r}")
    if many and batch is not None and len(generator) not in (1, batch):
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}; pass one per sample (or one)")


def check_noise_std(value, name: str = "noise_std") -> float:
    """A Gaussian noise std: a finite number in 0 .. :data:`MAX_NOISE_STD` (images are in [-1, 1])."""
    return check_number(value, name, 0, MAX_NOISE_STD,
                        fix="noise is in [-1, 1] image units (an std of s in 0-255 units is s / 127.5)")


def check_image_range(x: torch.Tensor, name: str, noise_std: float = 0.0) -> None:
    """Refuse an image (or a measurement of one) whose values reach beyond [-1, 1] by more than the noise
    (4 noise stds) and :data:`RANGE_MARGIN`: a 0-255 or 0-1 tensor handed over as it is. One host read."""
    bound = 1 + RANGE_MARGIN + 4 * float(noise_std)
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if low < -bound or high > bound:
        raise ValueError(f"{name} has values in [{low:.4g}, {high:.4g}], but images and their measurements are in "
                         f"[-1, 1]; map a 0-255 image with x / 127.5 - 1 and a 0-1 image with 2 x - 1 (or read "
                         f"files with tasks.load_image)")
