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
from .composition import Composition, resolve_parts_with
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
        OperatorEntry("motion_blur", MotionBlur, example={"kernel_size": 31}),
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
            if key.strip() in kwargs:
                raise ValueError(f"{key.strip()} is given twice in the operator spec {spec!r}; give each parameter once")
            kwargs[key.strip()] = _parse_value(value.strip())
    return name.strip(), kwargs


def split_stages(spec: str) -> list[str]:
    """The stages of a piped spec, ``"gaussian_blur | sr:factor=2"`` -> ``["gaussian_blur", "sr:factor=2"]``; a
    ValueError for an empty stage (a leading, trailing or doubled ``|``)."""
    stages = [stage.strip() for stage in spec.split("|")]
    for index, stage in enumerate(stages):
        if not stage:
            where = "before '|'" if index == 0 else "after '|'"
            raise ValueError(f"empty stage {where} in the operator spec {spec!r}; remove the extra '|' or put an "
                             f"operator there, e.g. 'gaussian_blur | sr:factor=2'")
    return stages


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


def as_operator(op: Any, **kwargs) -> Operator:
    """``op`` as an Operator: an Operator is returned unchanged; a spec string goes through :func:`make_operator`;
    a plain callable ``fn(x) -> y`` or an ``nn.Module`` becomes the registry's ``function`` operator,
    ``FunctionOperator(op, **kwargs)`` (``linear=``, ``adjoint=``, ``input_shape=``, ``noise_std=``,
    ``poisson_rate=`` passed through; a Module is held as a submodule, so ``.to()`` reaches its weights)."""
    if isinstance(op, Operator):
        if kwargs:
            raise ValueError("keyword arguments cannot be applied to an already-built operator")
        return op
    if isinstance(op, str):
        return make_operator(op, **kwargs)
    if isinstance(op, type):
        raise ValueError(f"got the class {op.__name__}, not an operator; pass an instance, e.g. {op.__name__}(...)")
    if callable(op):
        allowed = [name for name in get_entry("function").parameters() if name != "fn"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"a function operator has no parameter(s) {unknown}; its parameters are {allowed}")
        return FunctionOperator(op, **kwargs)
    raise ValueError(f"an operator must be an operators.Operator, a spec string ('sr:factor=4'), a callable "
                     f"fn(x) -> y or an nn.Module, got {type(op).__name__}")


resolve_parts_with(as_operator)  # Composition's parts (spec strings, callables) are built by this registry


def make_operator(spec: str | Operator | Any, **kwargs) -> Operator:
    """Build an operator from a spec string (``"sr:factor=4"``, ``"gaussian_blur | sr:factor=2"``) or a name
    plus keyword arguments; keyword arguments override those in the spec. An Operator is returned as is; a
    callable or an ``nn.Module`` is wrapped as a ``function`` operator (see :func:`as_operator`)."""
    if not isinstance(spec, str):
        return as_operator(spec, **kwargs)
    if "|" in spec:
        return Composition(split_stages(spec), **kwargs)
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


def _spec_value(value: Any) -> str | None:
    """``value`` as spec text that :func:`parse_spec` reads back equal: a bare word when that parses as the same
    string (``reflect``, ``torch:tanh``, a path), else a Python literal; None for anything else (a tensor)."""
    if isinstance(value, str):
        if value and value == value.strip() and not any(c in value for c in ",=|()[]'\""):
            try:
                if _parse_value(value) == value:
                    return value
            except Exception:  # literal_eval raises more than ValueError for odd text
                pass
        return repr(value)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return repr(value)
    return None


def _same(value: Any, default: Any) -> bool:
    return default is not inspect.Parameter.empty and type(value) is type(default) and value == default


def _leaf_spec(operator: Operator) -> str | None:
    name = operator_name(operator)
    if name is None or name == "compose":
        return None
    arguments = operator.spec_arguments()
    if arguments is None:
        return None
    defaults = REGISTRY[name].parameters()
    kept = {key: value for key, value in arguments.items() if not _same(value, defaults.get(key, inspect.Parameter.empty))}
    texts = []
    for key, value in kept.items():
        text = _spec_value(value)
        if text is None:
            return None
        texts.append(f"{key}={text}")
    spec = name + (":" + ",".join(texts) if texts else "")
    try:
        parsed = parse_spec(spec)
    except ValueError:
        return None
    return spec if "|" not in spec and parsed == (name, kept) else None


def _composition_spec(operator: Composition, pipe: bool) -> str | None:
    parts = [_spec(part, pipe=False) for part in operator.parts]
    if any(part is None for part in parts):
        return None
    if pipe and not operator.noise_std and operator.poisson_rate is None:
        return " | ".join(parts)
    expected: dict[str, Any] = {"operators": parts}
    if operator.noise_std:
        expected["noise_std"] = operator.noise_std
    if operator.poisson_rate is not None:
        expected["poisson_rate"] = operator.poisson_rate
    spec = "compose:" + ",".join(f"{key}={value!r}" for key, value in expected.items())
    try:
        parsed = parse_spec(spec)
    except ValueError:
        return None
    return spec if "|" not in spec and parsed == ("compose", expected) else None


def _spec(operator: Operator, pipe: bool = True) -> str | None:
    if type(operator) is Composition:
        return _composition_spec(operator, pipe)
    return _leaf_spec(operator)


def operator_spec(operator: Operator) -> str | None:
    """The spec string that :func:`make_operator` rebuilds into an equal operator (same class, same parameters,
    ``noise_std`` / ``poisson_rate`` included; parameters at their defaults are left out), so that results can
    record an operator by its spec: ``"gaussian_blur:sigma=2.0 | sr:factor=2"``. A composition is written with
    ``|`` (or as ``compose:operators=[...],noise_std=...`` when it has its own noise).

    Returns None when no spec describes the operator: a class the registry does not hold (an ``Inpainting``
    with a tensor mask, a ``Convolution`` with a tensor kernel, a user's subclass), a function operator holding
    a callable without an importable ``"module:function"`` name (a lambda, a local function, an ``nn.Module``),
    or a value a spec cannot carry.
    """
    if not isinstance(operator, Operator):
        raise ValueError(f"operator_spec takes an operators.Operator, got {type(operator).__name__}")
    return _spec(operator)
