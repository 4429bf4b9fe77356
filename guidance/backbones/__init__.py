"""Adapters for real checkpoints: the :class:`FlowModel` base every flow model implements, the shared pipeline
mechanics (``pipeline``: diffusers-pipeline plumbing, ``autoencoder``: the latent codec), one file per family
(``sd3``, ``flux``, ``generic``), the embedded default model's folder checks (``default``) and the one table of
families (``registry``) that :func:`guidance.load_model` and ``flowsteer models`` read.

The family adapters import diffusers' pipeline modules; they are not imported here, so that this package stays
light (``guidance.SD3Model`` and friends load them on first access).
"""

from .base import FlowModel
from .registry import BACKBONES, Backbone, get_backbone

__all__ = ["BACKBONES", "Backbone", "FlowModel", "get_backbone"]
