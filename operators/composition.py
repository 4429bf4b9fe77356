"""Composition of operators: A = A_n ∘ … ∘ A_1."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .base import LinearOperator, Operator
from .noise import randn_like

#: How a part that is not yet an Operator (a spec string, a callable, an ``nn.Module``) becomes one. The registry,
#: which holds Composition as its ``compose`` entry, installs its :func:`operators.as_operator` here when it loads
#: (``operators`` always loads it), so this module needs nothing from the registry.
_part_resolver: Callable[[Any], Operator] | None = None


def resolve_parts_with(resolver: Callable[[Any], Operator]) -> None:
    """Make ``resolver`` turn the parts of every Composition built from now on into Operators."""
    global _part_resolver
    _part_resolver = resolver


def _resolve_part(op: Any) -> Operator:
    if _part_resolver is None:  # not reached: importing this module loads the operators package, hence the registry
        if isinstance(op, Operator):
            return op
        raise ValueError("spec strings and callables in a composition need the operator registry: import operators")
    return _part_resolver(op)


class Composition(LinearOperator):
    """Apply ``operators`` in order (first to last). Linear when every part is; then Aᵀ = A_1ᵀ ∘ … ∘ A_nᵀ.

    The parts' own noise is ignored: the composition adds its own ``noise_std`` / ``poisson_rate`` once.
    Parts may be operators, spec strings for :func:`operators.make_operator`, or callables / ``nn.Module``s
    (wrapped as function operators, see :func:`operators.as_operator`).
    """

    is_linear = False  # decided per instance

    def __init__(self, operators: Sequence[Operator | str | Callable], noise_std: float = 0.0,
                 poisson_rate: float | None = None):
        super().__init__(noise_std=noise_std, poisson_rate=poisson_rate)
        if isinstance(operators, (str, Operator)) or not hasattr(operators, "__iter__"):
            raise ValueError(f"operators must be a list of operators or spec strings, got {type(operators).__name__}")
        parts = [_resolve_part(op) for op in operators]
        if not parts:
            raise ValueError("a composition needs at least one operator")
        self.parts = nn.ModuleList(parts)
        self.is_linear = all(op.is_linear for op in parts)
        self.measures_image_range = all(op.measures_image_range for op in parts)
        self.in_channels = parts[0].in_channels

    def check_input(self, x: torch.Tensor) -> None:
        self.parts[0].check_input(x)

    def check_measurement(self, y: torch.Tensor) -> None:
        self.parts[-1].check_measurement(y)

    def _linear_tail(self) -> tuple[list[Operator], list[Operator]]:
        """(the parts up to the last nonlinear one, the linear parts after it)."""
        last = max((i for i, op in enumerate(self.parts) if not op.is_linear), default=-1)
        return list(self.parts)[:last + 1], list(self.parts)[last + 1:]

    @property
    def structural_zeros(self) -> bool:
        return any(op.structural_zeros for op in self._linear_tail()[1])

    def measured_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """Where A x can be nonzero, when a linear stage after the last nonlinear one has structural zeros (an
        inpainting stage): the entries that those linear stages map a Gaussian probe (float64, drawn from a
        fixed-seed generator) to a nonzero. A zero row of A gives an exact 0 for every input; a nonzero row gives
        0 with probability 0. None when no such stage has structural zeros."""
        head, tail = self._linear_tail()
        if not any(op.structural_zeros for op in tail):
            return None
        with torch.no_grad():
            for op in head:
                x = op(x)
            probe = randn_like(x.to(torch.float64 if x.device.type != "mps" else x.dtype),
                               torch.Generator().manual_seed(0))
            try:
                for op in tail:
                    probe = op(probe)
            except RuntimeError:  # a wrapped module that computes in its own dtype only
                probe = randn_like(x, torch.Generator().manual_seed(0))
                for op in tail:
                    probe = op(probe)
        return probe != 0

    def A(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.parts:
            x = op(x)
        return x

    def _require_linear(self):
        if not self.is_linear:
            names = [type(op).__name__ for op in self.parts if not op.is_linear]
            raise ValueError(f"this composition is not linear ({', '.join(names)}): it has no adjoint")

    def input_shape(self, output_shape):
        self._require_linear()
        for op in reversed(self.parts):
            output_shape = op.input_shape(output_shape)
        return tuple(output_shape)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._require_linear()
        for op in reversed(self.parts):
            y = op.adjoint(y)
        return y

    def pseudo_inverse(self, y: torch.Tensor, regularization: float | str = "exact") -> torch.Tensor:
        self._require_linear()
        return super().pseudo_inverse(y, regularization)
