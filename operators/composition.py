"""Composition of operators: A = A_n ∘ … ∘ A_1."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .base import LinearOperator, Operator


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
        from .registry import as_operator

        if isinstance(operators, (str, Operator)) or not hasattr(operators, "__iter__"):
            raise ValueError(f"operators must be a list of operators or spec strings, got {type(operators).__name__}")
        parts = [as_operator(op) for op in operators]
        if not parts:
            raise ValueError("a composition needs at least one operator")
        self.parts = nn.ModuleList(parts)
        self.is_linear = all(op.is_linear for op in parts)
        self.in_channels = parts[0].in_channels

    def check_input(self, x: torch.Tensor) -> None:
        self.parts[0].check_input(x)

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
