"""The operator registry: names, spec strings and parameter listings.

A spec is ``"name"`` or ``"name:key=value,key=value"`` (values parsed as Python literals, else kept as
strings); ``"spec | spec"`` composes left to right. Registering an operator is one line in ``REGISTRY``;
the command line and the generic tests enumerate it.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Operator
from .colorization import Colorization
from .composition import Composition
from .denoising import Denoising
from .function import FunctionOperator
from .gaussian_blur import GaussianBlur
from .inpainting import BoxInpainting, FileMaskInpainting, FreeformInpainting, RandomInpainting
from .jpeg import JPEGCompression
from .motion_blur import LineMotionBlur, MotionBlur
from .super_resolution import AveragePoolDownsampling, BicubicDownsampling


EXAMPLE_MASK = str(Path(__file__).parent / "examples" / "mask_64.png")  # a 64x64 free-form mask, white = missing


@dataclass(frozen=True)
class OperatorEntry:
    """A registered operator: its name, class, and arguments that build a small working example
    (used by the generic tests when the defaults alone do not make one)."""

    name: str
    cls: type
    example: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return " ".join(doc.split("\n\n")[0].split())

    def parameters(self) -> dict[str, Any]:
        """Constructor parameters and their defaults (``inspect.Parameter.empty`` when required)."""
        signature = inspect.signature(self.cls.__init__)
        return {n: p.default for n, p in signature.parameters.items() if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD}


REGISTRY: dict[str, OperatorEntry] = {
    entry.name: entry
    for entry in [
        OperatorEntry("gaussian_blur", GaussianBlur),
        OperatorEntry("motion_blur", MotionBlur),
        OperatorEntry("line_motion_blur", LineMotionBlur),
        OperatorEntry("sr", BicubicDownsampling),
        OperatorEntry("sr_avgpool", AveragePoolDownsampling),
        OperatorEntry("inpaint_box", BoxInpainting),
        OperatorEntry("inpaint_random", RandomInpainting),
        OperatorEntry("inpaint_freeform", FreeformInpainting),
        OperatorEntry("inpaint_mask", FileMaskInpainting, example={"path": EXAMPLE_MASK}),
        OperatorEntry("denoise", Denoising),
        OperatorEntry("colorize", Colorization),
        OperatorEntry("jpeg", JPEGCompression),
        OperatorEntry("compose", Composition, example={"operators": ["gaussian_blur:kernel_size=5,sigma=1.0", "sr:factor=2"]}),
        OperatorEntry("function", FunctionOperator, example={"fn": "torch:tanh"}),
    ]
}


def list_operators() -> list[OperatorEntry]:
    """Every registered operator, in registration order."""
    return list(REGISTRY.values())


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sr:factor=4,noise_std=0.05"`` -> ``("sr", {"factor": 4, "noise_std": 0.05})``."""
    name, _, arguments = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    if arguments.strip():
        parts = []
        for chunk in arguments.split(","):  # re-join commas inside brackets, e.g. size=(8,16)
            if parts and parts[-1].count("(") + parts[-1].count("[") > parts[-1].count(")") + parts[-1].count("]"):
                parts[-1] += "," + chunk
            else:
                parts.append(chunk)
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"malformed operator spec {spec!r}: expected name:key=value,key=value")
            kwargs[key.strip()] = _parse_value(value.strip())
    return name.strip(), kwargs


def get_entry(name: str) -> OperatorEntry:
    """The registry entry for ``name``, or a ValueError that suggests the closest names."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown operator {name!r}{hint} Available: {', '.join(REGISTRY)}")


def operator_name(operator: Operator) -> str | None:
    """The registry name of an operator's class (``"sr"`` for a :class:`BicubicDownsampling`); None for a class
    the registry does not hold (a user's own operator, a subclass)."""
    return next((name for name, entry in REGISTRY.items() if type(operator) is entry.cls), None)


def make_operator(spec: str | Operator, **kwargs) -> Operator:
    """Build an operator from a spec string (``"sr:factor=4"``, ``"gaussian_blur | sr:factor=2"``) or a name
    plus keyword arguments; keyword arguments override those in the spec. An Operator is returned as is."""
    if isinstance(spec, Operator):
        if kwargs:
            raise ValueError("keyword arguments cannot be applied to an already-built operator")
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"an operator spec must be a string or an Operator, got {type(spec).__name__}")
    if "|" in spec:
        return Composition([s for s in spec.split("|")], **kwargs)
    name, spec_kwargs = parse_spec(spec)
    entry = get_entry(name)
    arguments = {**spec_kwargs, **kwargs}
    allowed = entry.parameters()
    unknown = sorted(set(arguments) - set(allowed))
    if unknown:
        raise ValueError(f"operator {name!r} has no parameter(s) {unknown}; its parameters are {list(allowed)}")
    missing = [n for n, d in allowed.items() if d is inspect.Parameter.empty and n not in arguments]
    if missing:
        raise ValueError(f"operator {name!r} needs the parameter(s) {missing}")
    return entry.cls(**arguments)
