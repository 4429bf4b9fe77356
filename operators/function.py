"""Any user callable as an operator."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from .base import LinearOperator


def resolve_callable(fn: Callable | str) -> Callable:
    """A callable, or a ``"package.module:function"`` string naming one."""
    if callable(fn):
        return fn
    if not isinstance(fn, str) or ":" not in fn:
        raise ValueError(f"fn must be a callable or a 'module:function' string, got {fn!r}")
    module_name, _, attribute = fn.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {fn!r}: {error}") from None
    if not callable(target):
        raise ValueError(f"{fn!r} is not callable")
    return target


def callable_name(fn: Callable) -> str | None:
    """The ``"module:name"`` string that :func:`resolve_callable` turns back into this very ``fn``, or None when
    there is none (a lambda, a local function, a callable object such as an ``nn.Module``)."""
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str) or module == "__main__":
        return None
    for attribute in dict.fromkeys((getattr(fn, "__qualname__", None), getattr(fn, "__name__", None))):
        if not isinstance(attribute, str) or "<" in attribute:
            continue
        name = f"{module}:{attribute}"
        try:
            if resolve_callable(name) is fn:
                return name
        except ValueError:
            continue
    return None


class FunctionOperator(LinearOperator):
    """Wrap ``fn(x) -> y`` (differentiable torch code) as an operator.

    An ``nn.Module`` given as ``fn`` (or ``adjoint``) is held as a submodule, so ``op.to(...)`` / ``op.double()``
    reach its parameters and buffers.

    Args:
        fn: the forward model: a callable, an ``nn.Module`` or a ``"module:function"`` string.
        linear: declare ``fn`` linear; the adjoint is then its vector-Jacobian product unless ``adjoint`` is given.
        adjoint: optional ``adjoint(y) -> x`` for a linear ``fn`` (or a ``"module:function"`` string).
        input_shape: optional ``output_shape -> input_shape`` for a linear ``fn`` that changes the shape (or a
            ``"module:function"`` string). Without it, the adjoint of a shape-changing ``fn`` takes the input
            shape from the last image the operator mapped to that measurement shape.
    """

    is_linear = False  # decided per instance

    def __init__(self, fn: Callable | str, linear: bool = False, adjoint: Callable | str | None = None,
                 input_shape: Callable | str | None = None, noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        if not isinstance(linear, (bool, int)) or linear not in (True, False):
            raise ValueError(f"linear must be True or False, got {linear!r}")
        self.fn = resolve_callable(fn)  # an nn.Module becomes a submodule here
        self.is_linear = bool(linear)
        if adjoint is not None and not linear:
            raise ValueError("an adjoint was given for a function not declared linear; pass linear=True")
        self._user_adjoint = None if adjoint is None else resolve_callable(adjoint)
        self._user_input_shape = None if input_shape is None else resolve_callable(input_shape)
        self._seen_shapes: dict[tuple, tuple] = {}  # measurement shape -> image shape (batch left out)
        # the "module:function" names that rebuild each callable (None: a Python object no spec can name)
        self._names = {key: (value if isinstance(value, str) else callable_name(value))
                       for key, value in (("fn", fn), ("adjoint", adjoint), ("input_shape", input_shape))
                       if value is not None}

    def spec_arguments(self) -> dict | None:
        """The constructor arguments as spec values; None when a callable has no ``"module:function"`` name."""
        if any(name is None for name in self._names.values()):
            return None
        return {"fn": self._names["fn"], "linear": self.is_linear, "adjoint": self._names.get("adjoint"),
                "input_shape": self._names.get("input_shape"), "noise_std": self.noise_std,
                "poisson_rate": self.poisson_rate}

    def A(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"the wrapped function returned {type(y).__name__}, expected a torch.Tensor")
        if self.is_linear and self._user_input_shape is None and y.shape[1:] != x.shape[1:]:
            self._seen_shapes[tuple(y.shape[1:])] = tuple(x.shape[1:])
        return y

    def input_shape(self, output_shape):
        if self._user_input_shape:
            return tuple(self._user_input_shape(output_shape))
        seen = self._seen_shapes.get(tuple(output_shape[1:]))
        return (output_shape[0], *seen) if seen else tuple(output_shape)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not self.is_linear:
            raise ValueError("this function operator is not declared linear (linear=True): it has no adjoint")
        if self._user_adjoint:
            return self._user_adjoint(y)
        try:
            return super().A_adjoint(y)
        except ValueError as error:
            if "but A maps to shape" not in str(error):
                raise
            raise ValueError(f"{error}; the function changes the shape: apply the operator to an image first or pass "
                             f"input_shape=") from None
