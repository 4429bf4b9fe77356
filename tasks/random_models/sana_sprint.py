"""Randomly initialised SANA-Sprint components (the family of ``guidance/backbones/sana_sprint.py``): SANA's tiny
DC-AE, Gemma text encoder and transformer (:mod:`tasks.random_models.sana`) with the guidance embedding and RMS
qk-norm, and the released ``SCMScheduler`` (TrigFlow, sigma_data 0.5)."""

from __future__ import annotations

from diffusers import SanaSprintPipeline, SCMScheduler

from .sana import _eval, gemma_tokenizer, tiny_dc_ae, tiny_gemma, tiny_sana_transformer

__all__ = ["tiny_sana_sprint_components", "tiny_sana_sprint_pipeline"]


def tiny_sana_sprint_components(latent_channels: int = 8, levels: int = 6) -> dict:
    """Components of a tiny SanaSprintPipeline (guidance-embedding transformer, SCM scheduler with sigma_data 0.5)."""
    tokenizer = gemma_tokenizer()
    return _eval({
        "tokenizer": tokenizer,
        "text_encoder": tiny_gemma(16, len(tokenizer)),
        "vae": tiny_dc_ae(latent_channels, levels),
        "transformer": tiny_sana_transformer(latent_channels, 16, sprint=True),
        "scheduler": SCMScheduler(prediction_type="trigflow", sigma_data=0.5),
    })


def tiny_sana_sprint_pipeline(latent_channels: int = 8, levels: int = 6) -> SanaSprintPipeline:
    """A float32 CPU SanaSprintPipeline in eval mode with tiny random components."""
    pipe = SanaSprintPipeline(**tiny_sana_sprint_components(latent_channels, levels))
    pipe.set_progress_bar_config(disable=True)
    return pipe
