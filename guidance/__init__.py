"""Frozen rectified-flow models, the sampler and the guidance methods.

Heavy backbone adapters (SD3, Flux) import diffusers' pipeline modules; they are loaded on first access so
that ``import guidance`` stays light.
"""

from importlib import import_module

from . import flow
from .calibration import CRWTable, calibrate, load_crw
from .loading import ModelNotFoundError, load_decoder, load_model
from .methods import DivergenceError, MethodResult, get_method, list_methods
from .objectives import (CallableObjective, ClassifierObjective, MeasurementFidelity, Objective, RewardObjective,
                         objective_gradient)
from .models.analytic import AnalyticGMMFlow, GaussianMixture, image_patches
from .models.base import FlowModel
from .sampler import SampleResult, initial_noise, sample, start_state

_LAZY = {
    "SD3Model": "guidance.models.sd3",
    "SD3Condition": "guidance.models.sd3",
    "FluxModel": "guidance.models.flux",
    "FluxCondition": "guidance.models.flux",
    "GenericFlowModel": "guidance.models.generic",
}

__all__ = [
    "AnalyticGMMFlow", "CRWTable", "CallableObjective", "calibrate", "load_crw", "ClassifierObjective", "DivergenceError", "FlowModel",
    "GaussianMixture", "MeasurementFidelity", "MethodResult", "ModelNotFoundError", "Objective",
    "RewardObjective", "SampleResult", "flow", "get_method", "image_patches", "initial_noise", "list_methods",
    "load_decoder", "load_model", "objective_gradient", "sample", "start_state", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'guidance' has no attribute {name!r}")
