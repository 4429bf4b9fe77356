"""Any user callable as an operator."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

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


def module_of(fn: Callable) -> nn.Module | None:
    """The ``nn.Module`` whose tensors ``fn`` computes with: ``fn`` itself, or the module a bound method such as
    ``net.encode`` belongs to; None for a plain function."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None) if inspect.ismethod(fn) else None
    return owner if isinstance(owner, nn.Module) else None


class FunctionOperator(LinearOperator):
    """Wrap ``fn(x) -> y`` (differentiable torch code) as an operator.

    The measurement may be an image batch or any other batch, e.g. (B, m) vectors. The module a callable
    computes with is held as a submodule: an ``nn.Module`` given as ``fn`` is ``fn`` itself; the module of a bound
    method such as ``net.encode`` is ``fn_module``; that of the adjoint ``adjoint_module`` (unless already held).
    So ``op.to(...)`` / ``op.double()`` reach its parameters and buffers and ``state_dict()`` holds them; a plain
    function stays a plain function.

    A linear ``fn`` has the adjoint ``adjoint`` or, without it, the vector-Jacobian product of ``fn``; its
    pseudo-inverse A^+ y = Aᵀ (A Aᵀ)^{-1} y is solved by conjugate gradients (:meth:`A_dagger_cg`), exact to
    its tolerance when A Aᵀ is well conditioned.

    Args:
        fn: the forward model: a callable, an ``nn.Module`` or a ``"module:function"`` string.
        linear: declare ``fn`` linear; the adjoint is then its vector-Jacobian product unless ``adjoint`` is given.
        adjoint: optional ``adjoint(y) -> x`` for a linear ``fn`` (or a ``"module:function"`` string).
        input_shape: optional ``output_shape -> input_shape`` for a linear ``fn`` that changes the shape (or a
            ``"module:function"`` string). Without it, the adjoint of a shape-changing ``fn`` takes the input
            shape from the last image the operator mapped to that measurement shape.
    """

    is_linear = False  # decided per instance
    measures_image_range = False  # any values

    def __init__(self, fn: Callable | str, linear: bool = False, adjoint: Callable | str | None = None,
                 input_shape: Callable | str | None = None, noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        if not isinstance(linear, (bool, int)) or linear not in (True, False):
            raise ValueError(f"linear must be True or False, got {linear!r}")
        self.is_linear = bool(linear)
        if adjoint is not None and not linear:
            raise ValueError("an adjoint was given for a function not declared linear; pass linear=True")
        self.fn = resolve_callable(fn)  # an nn.Module becomes the submodule "fn"
        # plain attributes (a module among them is held below, once)
        object.__setattr__(self, "_user_adjoint", None if adjoint is None else resolve_callable(adjoint))
        object.__setattr__(self, "_user_input_shape", None if input_shape is None else resolve_callable(input_shape))
        held = [self.fn] if isinstance(self.fn, nn.Module) else []
        for name, function in (("fn_module", self.fn), ("adjoint_module", self._user_adjoint)):
            module = None if function is None else module_of(function)
            if module is not None and not any(module is other for other in held):
                setattr(self, name, module)
                held.append(module)
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
        if y.ndim < 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"the wrapped function mapped a batch of {x.shape[0]} images (shape {tuple(x.shape)}) to "
                             f"shape {tuple(y.shape)}; it must keep the batch dimension first, one measurement "
                             f"per image")
        if self.is_linear and self._user_input_shape is None and y.shape[1:] != x.shape[1:]:
            self._seen_shapes[tuple(y.shape[1:])] = tuple(x.shape[1:])
        return y

    def check_measurement(self, y: torch.Tensor) -> None:
        """A measurement is any floating tensor with the batch first: images (B, C, H, W), vectors (B, m), ..."""
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.ndim < 1 or not y.is_floating_point():
            raise ValueError(f"y must be a floating-point tensor with the batch dimension first, got dtype {y.dtype} "
                             f"and shape {tuple(y.shape)}")

    def input_shape(self, output_shape):
        if self._user_input_shape:
            return tuple(self._user_input_shape(output_shape))
        seen = self._seen_shapes.get(tuple(output_shape[1:]))
        if seen:
            return (output_shape[0], *seen)
        if len(output_shape) != 4:
            raise ValueError(f"the image shape for a measurement of shape {tuple(output_shape)} is not known yet: "
                             f"apply the operator to an image first, or pass input_shape= (a function "
                             f"output_shape -> image shape)")
        return tuple(output_shape)

    def _require_linear(self) -> None:
        if not self.is_linear:
            raise ValueError("this function operator is not declared linear (linear=True): it has no adjoint")

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._require_linear()
        if self._user_adjoint:
            return self._user_adjoint(y)
        try:
            return super().A_adjoint(y)
        except ValueError as error:
            if "but A maps to shape" not in str(error):
                raise
            raise ValueError(f"{error}; the function changes the shape: apply the operator to an image first or pass "
                             f"input_shape=") from None

    @property
    def has_pseudo_inverse(self) -> bool:
        return self.is_linear

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """A^+ y by conjugate gradients on A Aᵀ u = y, then Aᵀ u (:meth:`A_dagger_cg`)."""
        self._require_linear()
        return self.A_dagger_cg(y)
