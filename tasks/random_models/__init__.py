"""Random-weight models built from config, fully offline: one file per backbone family, named as its adapter in
``guidance/backbones/`` (sd3.py, flux.py, flux2.py, qwen_image.py, z_image.py, lumina2.py, sana.py, sana_sprint.py,
chroma.py), each with the family's tiny builders (the real architecture in miniature, for the tests and demos) and,
where ``flowsteer speed`` measures it, its full-size builders (the released architecture with random weights: real
time and memory on a GPU without a checkpoint). ``common.py`` holds what they share (word-level tokenizers, tiny
VAEs and text encoders, the scaling of miniatures); :data:`TINY_PIPELINES` below is the one table of them.

A new backbone family adds one file here and one row to :data:`TINY_PIPELINES`.
"""

from __future__ import annotations

import importlib

__all__ = ["TINY_PIPELINES", "tiny_pipeline"]

#: The tiny pipeline of every family (and variant), built offline from config with random weights:
#: name -> (builder module, builder, keyword arguments).
TINY_PIPELINES: dict[str, tuple[str, str, dict]] = {
    "sd3": ("tasks.random_models.sd3", "sd3_pipeline", {}),
    "flux": ("tasks.random_models.flux", "flux_pipeline", {"dev": True}),
    "flux2-dev": ("tasks.random_models.flux2", "tiny_flux2_pipeline", {"variant": "dev"}),
    "flux2-klein": ("tasks.random_models.flux2", "tiny_flux2_pipeline", {"variant": "klein"}),
    "qwen_image": ("tasks.random_models.qwen_image", "tiny_qwen_image_pipeline", {}),
    "z_image": ("tasks.random_models.z_image", "tiny_z_image_pipeline", {}),
    "lumina2": ("tasks.random_models.lumina2", "tiny_lumina2_pipeline", {}),
    "sana": ("tasks.random_models.sana", "tiny_sana_pipeline", {}),
    "sana_sprint": ("tasks.random_models.sana_sprint", "tiny_sana_sprint_pipeline", {}),
    "chroma": ("tasks.random_models.chroma", "tiny_chroma_pipeline", {}),
}


def tiny_pipeline(name: str):
    """A float32 CPU pipeline of the family ``name`` (a key of :data:`TINY_PIPELINES`) with tiny random
    components."""
    if name not in TINY_PIPELINES:
        raise ValueError(f"unknown tiny pipeline {name!r}; choose from {', '.join(TINY_PIPELINES)}")
    module, builder, kwargs = TINY_PIPELINES[name]
    return getattr(importlib.import_module(module), builder)(**kwargs)
