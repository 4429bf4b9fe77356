"""Frozen rectified-flow models, the sampler and the guidance methods.

Heavy backbone adapters (SD3, Flux) import diffusers' pipeline modules; they are loaded on first access so
that ``import guidance`` stays light.
"""

from importlib import import_module

from . import flow
from .features.calibration import CRWTable, calibrate, load_crw
from .features.hard_inputs import (HARD_FUNCTIONS, DecisionObjective, HardInputObjective, argmax_decision,
                                   get_hard_function, hard_function, quantize, threshold)
from .loading.models import ModelNotFoundError, load_decoder, load_model
from .methods import DivergenceError, MethodResult, get_method, list_methods
from .objectives import (CallableObjective, ClassifierObjective, MeasurementFidelity, Objective, RewardObjective,
                         objective_gradient)
from .analytic import AnalyticGMMFlow, AnalyticSimplexFlow, CategoricalMixture, GaussianMixture, image_patches
from .backbones import FlowModel
from .sequences import (EndpointNetwork, GumbelSoftmaxPath, NetworkSimplexFlow, SequenceSample, SimplexFlow,
                        check_simplex, sample_sequences, train_simplex_flow)
from .backbones.registry import BACKBONES as _BACKBONES
from .sampler import SampleResult, initial_noise, sample, start_state
from .inversion import InversionResult, invert
from .sequences.classifier import SequenceClassifier, train_sequence_classifier

#: names imported on first use: every backbone adapter of the registry (SD3Model, FluxModel, Flux2Model,
#: QwenImageModel, ...) and a few more, so that ``import guidance`` loads no diffusers pipeline module
_LAZY = {
    **{b.adapter.partition(":")[2]: b.adapter.partition(":")[0] for b in _BACKBONES},
    "SD3Condition": "guidance.backbones.sd3",
    "FluxCondition": "guidance.backbones.flux",
    "flowsteer_reconstructor": "guidance.features.deepinv_reconstructor",
}

__all__ = [
    "AnalyticGMMFlow", "CRWTable", "CallableObjective", "calibrate", "load_crw", "ClassifierObjective", "DivergenceError", "FlowModel",
    "GaussianMixture", "MeasurementFidelity", "MethodResult", "ModelNotFoundError", "Objective",
    "InversionResult", "RewardObjective", "SampleResult", "invert", "flow", "get_method", "image_patches", "initial_noise", "list_methods",
    "load_decoder", "load_model", "objective_gradient", "sample", "start_state",
    "HARD_FUNCTIONS", "DecisionObjective", "HardInputObjective", "argmax_decision", "get_hard_function",
    "hard_function", "quantize", "threshold",
    "AnalyticSimplexFlow", "CategoricalMixture", "GumbelSoftmaxPath", "SequenceSample", "SimplexFlow", "check_simplex",
    "sample_sequences", "EndpointNetwork", "NetworkSimplexFlow", "train_simplex_flow", "SequenceClassifier",
    "train_sequence_classifier", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'guidance' has no attribute {name!r}")
