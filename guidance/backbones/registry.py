"""The backbone registry: one entry per model family flowsteer has an adapter for.

:func:`guidance.load_model` reads it to tell a folder's family from its ``model_index.json`` (``class_prefix``),
to pick the diffusers pipeline class that loads it (``pipeline``) and to wrap a pipeline object by the class of its
transformer (``transformer``); ``flowsteer models`` lists its ``checkpoints``. Adding a backbone is one adapter
file in this folder plus one entry in :data:`BACKBONES`.

Nothing here imports diffusers or an adapter: classes are named by strings and imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

__all__ = ["BACKBONES", "Backbone", "family_for_index", "get_backbone", "known_models", "pipeline_families"]


@dataclass(frozen=True)
class Backbone:
    """One model family.

    Attributes:
        name: the family's short name (``load_model``'s kind, the family column of ``flowsteer models``).
        title: how messages name its pipelines ("Stable Diffusion 3 / 3.5"); empty for families without one.
        short: how messages name its transformer ("SD3").
        adapter: ``"module:Class"`` of the :class:`~guidance.backbones.base.FlowModel` adapter.
        class_prefix: the prefix of ``_class_name`` in a folder's ``model_index.json`` that marks the family
            (None: not recognised by its class name, e.g. text-free generic folders).
        pipeline: the diffusers pipeline class that loads a folder of the family.
        transformer: the diffusers transformer class that marks a pipeline object of the family.
        checkpoints: (hub id or source, one-line summary) of the known checkpoints, as ``flowsteer models`` lists
            them.
    """

    name: str
    adapter: str
    title: str = ""
    short: str = ""
    class_prefix: str | None = None
    pipeline: str | None = None
    transformer: str | None = None
    checkpoints: tuple[tuple[str, str], ...] = ()

    def adapter_class(self) -> type:
        module, _, name = self.adapter.partition(":")
        return getattr(import_module(module), name)

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline)

    def transformer_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer)


#: Every family, in the order ``flowsteer models`` lists their checkpoints.
BACKBONES: tuple[Backbone, ...] = (
    Backbone("embedded", "guidance.backbones.generic:GenericFlowModel",
             checkpoints=(("default", "flowsteer's own small latent rectified-flow prior (no download)"),)),
    Backbone("sd3", "guidance.backbones.sd3:SD3Model", "Stable Diffusion 3 / 3.5", "SD3", "StableDiffusion3",
             "StableDiffusion3Pipeline", "SD3Transformer2DModel",
             (("stabilityai/stable-diffusion-3-medium-diffusers", "SD3 medium, 1024², 28 steps, CFG 7"),
              ("stabilityai/stable-diffusion-3.5-medium", "SD3.5 medium, 1024², 40 steps, CFG 4.5"),
              ("stabilityai/stable-diffusion-3.5-large", "SD3.5 large, 1024², 28 steps, CFG 3.5"))),
    Backbone("flux", "guidance.backbones.flux:FluxModel", "FLUX.1", "Flux", "Flux", "FluxPipeline",
             "FluxTransformer2DModel",
             (("black-forest-labs/FLUX.1-dev", "Flux dev, guidance-distilled, 28-50 steps"),
              ("black-forest-labs/FLUX.1-schnell", "Flux schnell, 1-4 steps"))),
    Backbone("generic", "guidance.backbones.generic:GenericFlowModel"),
)


def get_backbone(name: str) -> Backbone:
    for backbone in BACKBONES:
        if backbone.name == name:
            return backbone
    raise ValueError(f"unknown backbone family {name!r}; known: {[b.name for b in BACKBONES]}")


def pipeline_families() -> tuple[Backbone, ...]:
    """The families loaded as a whole diffusers pipeline (a pipeline class and a transformer class)."""
    return tuple(b for b in BACKBONES if b.pipeline and b.transformer)


def family_for_index(index: dict) -> Backbone | None:
    """The family whose ``class_prefix`` starts the index's ``_class_name``; None when none does."""
    name = str(index.get("_class_name", ""))
    return next((b for b in BACKBONES if b.class_prefix and name.startswith(b.class_prefix)), None)


def known_models() -> tuple[tuple[str, str, str], ...]:
    """(source, family, summary) of every known checkpoint, for ``flowsteer models``."""
    return tuple((source, b.name, summary) for b in BACKBONES for source, summary in b.checkpoints)
