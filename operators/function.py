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


class FunctionOperator(LinearOperator):
    """Wrap ``fn(x) -> y`` (differentiable torch code) as an operator.

    Args:
        fn: the forward model, or a ``"module:function"`` string.
        linear: declare ``fn`` linear; the adjoint is then its vector-Jacobian product unless ``adjoint`` is given.
        adjoint: optional ``adjoint(y) -> x`` for a linear ``fn``.
        input_shape: optional ``output_shape -> input_shape`` for a linear ``fn`` that changes the shape.
    """

    is_linear = False  # decided per instance

    def __init__(self, fn: Callable | str, linear: bool = False, adjoint: Callable | str | None = None,
                 input_shape: Callable | None = None, noise_std: float = 0.0, poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        self.fn = resolve_callable(fn)
        self.is_linear = bool(linear)
        if adjoint is not None and not linear:
            raise ValueError("an adjoint was given for a function not declared linear; pass linear=True")
        self._user_adjoint = None if adjoint is None else resolve_callable(adjoint)
        self._user_input_shape = input_shape

    def A(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"the wrapped function returned {type(y).__name__}, expected a torch.Tensor")
        return y

    def input_shape(self, output_shape):
        return tuple(self._user_input_shape(output_shape)) if self._user_input_shape else tuple(output_shape)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not self.is_linear:
            raise ValueError("this function operator is not declared linear (linear=True): it has no adjoint")
        return self._user_adjoint(y) if self._user_adjoint else super().A_adjoint(y)
