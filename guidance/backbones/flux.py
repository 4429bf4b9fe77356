"""FLUX.1 dev / schnell as a flow model.

Backbone conventions handled here and nowhere else:

* latents are seen by every caller as ordinary (B, C, H/8, W/8) tensors; inside, each 2x2 latent patch becomes
  one token, (B, C, h, w) -> (B, (h/2)(w/2), 4C), with image position ids [0, row, col] per token and zero
  text ids, and the transformer's output is unpacked back. Packing is a permutation, so an Euler step on the
  unpacked latent equals the pipeline's step on packed tokens;
* the transformer takes ``timestep = s`` and the distilled guidance value as they are (it multiplies both by
  1000 itself). dev: guidance embedding (default 3.5); schnell: none (``guidance_scale`` is ignored);
* optional true CFG with a negative prompt: v = v_neg + t (v_pos - v_neg), active iff t = ``true_cfg_scale`` > 1
  and a negative prompt is given. The pipeline makes two transformer calls; here it is one batched call on
  [positive, negative] (the same result up to float rounding, one launch of every kernel instead of two);
* schedule: linspace(1, 1/N, N) through the scheduler with mu from the image token count (dev shifts,
  schnell's config does not), and a final 0;
* latents z = (E(x) - shift) * scale with the VAE config's factors; image sides are multiples of
  2 * vae factor (16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import check_num_steps, repeat_for_batch, sigma_batch
from .mechanics import classifier_free, scheduler_sigmas, token_shift
from .pipeline import PipelineFlowModel, prompt_list

__all__ = ["FluxCondition", "FluxModel", "PackedLatents", "pack_latents", "unpack_latents", "latent_image_ids"]

def pack_latents(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): token (i, j) holds channels c of pixels (2i + a, 2j + b), c-major."""
    b, c, h, w = latent.shape
    tokens = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height`` x ``width`` (latent pixels)."""
    b, _, d = tokens.shape
    grid = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, d // 4, height, width)


def latent_image_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(rows * cols, 3) position ids [0, row, col] of the packed tokens, row-major."""
    r = torch.arange(rows, dtype=dtype).repeat_interleave(cols)
    c = torch.arange(cols, dtype=dtype).repeat(rows)
    return torch.stack([torch.zeros_like(r), r, c], dim=1).to(device)


@dataclass(frozen=True)
class FluxCondition:
    """Text conditioning for :class:`FluxModel` (n prompts; negatives only when true CFG is active)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    guidance_scale: float | None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    true_cfg_scale: float = 1.0

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def do_true_cfg(self) -> bool:
        return self.true_cfg_scale > 1 and self.negative_prompt_embeds is not None


class PackedLatents:
    """For models whose pipeline keeps its latents as packed 2x2 tokens (FLUX.1, Chroma, Qwen-Image): what a
    diffusers callback gets as ``latents`` (:meth:`~guidance.backbones.base.FlowModel.pipeline_latents`)."""

    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The state as the pipeline's loop keeps it: packed 2x2 tokens (B, hw/4, 4C), :func:`pack_latents`."""
        return pack_latents(x)

    def from_pipeline_latents(self, latents: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return unpack_latents(latents, like.shape[-2], like.shape[-1])


class FluxModel(PackedLatents, PipelineFlowModel):
    """Flow-model adapter around a diffusers ``FluxPipeline`` (components used as they are).

    Args:
        pipeline: a ``FluxPipeline`` (dev or schnell checkpoint).
        decoder: optional cheaper autoencoder for :meth:`decode` (e.g. TAEF1).
        encoder: optional cheaper autoencoder for :meth:`encode` (e.g. TAEF1).
    """

    pipeline_class = "FluxPipeline"
    condition_type = FluxCondition
    latent_multiple = 2

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        self.size_multiple = 2 * self.spatial_factor
        side = 128 * self.spatial_factor  # the pipeline's default_sample_size (1024 px for FLUX.1)
        self.default_size = (side, side)
        self.check_latent_channels(pipeline.transformer.config.in_channels, packed=4)

    @property
    def has_guidance_embedding(self) -> bool:
        """True for dev-style (guidance-distilled) transformers, False for schnell."""
        return bool(self.transformer.config.guidance_embeds)

    # -- geometry and schedule --------------------------------------------------------------------------
    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """linspace(1, 1/N, N), shifted by the scheduler with mu = calculate_shift(tokens), then a final 0."""
        check_num_steps(num_steps)
        h, w = self.latent_grid(height, width)
        return scheduler_sigmas(self.scheduler, num_steps, token_shift(self.scheduler.config, (h // 2) * (w // 2)))

    # -- text -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = 3.5,
        *,
        true_cfg_scale: float = 1.0,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        max_sequence_length: int = 512,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> FluxCondition:
        """Encode prompts once (cached) for :meth:`velocity`.

        ``guidance_scale`` is dev's distilled guidance value (default 3.5; ignored by schnell).
        ``true_cfg_scale`` > 1 with a negative prompt turns on true classifier-free guidance (one transformer
        call on a doubled batch per step). Precomputed ``prompt_embeds`` (n, L, joint_attention_dim) with
        ``pooled_prompt_embeds`` (n, pooled_projection_dim) may replace the prompt.
        """
        g = 3.5 if guidance_scale is None else float(guidance_scale)
        if not g >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        t = float(true_cfg_scale)
        if not t >= 0:
            raise ValueError(f"true_cfg_scale must be >= 0 (1 or less disables true CFG), got {true_cfg_scale}")
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length cannot exceed 512 (T5's limit in Flux), got {max_sequence_length}")
        g_used = g if self.has_guidance_embedding else None
        want_negative = t > 1 and (negative_prompt is not None or negative_prompt_embeds is not None)
        if prompt_embeds is not None or pooled_prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            self._check_embeds(prompt_embeds, pooled_prompt_embeds, "prompt_embeds", "pooled_prompt_embeds")
            pos, pooled = prompt_embeds, pooled_prompt_embeds
            n = pos.shape[0]
            neg = neg_pooled = None
            if want_negative:
                if negative_prompt_embeds is None:
                    neg_cond = self.condition(
                        negative_prompt, prompt_2=negative_prompt_2, max_sequence_length=pos.shape[1]
                    )
                    neg = repeat_for_batch(neg_cond.prompt_embeds, n, "prompt")
                    neg_pooled = repeat_for_batch(neg_cond.pooled_prompt_embeds, n, "prompt")
                else:
                    neg, neg_pooled = negative_prompt_embeds, negative_pooled_prompt_embeds
                self._check_embeds(neg, neg_pooled, "negative_prompt_embeds", "negative_pooled_prompt_embeds")
                if neg.shape != pos.shape:
                    raise ValueError(
                        f"negative_prompt_embeds {tuple(neg.shape)} must have the shape of prompt_embeds "
                        f"{tuple(pos.shape)}"
                    )
            return FluxCondition(pos, pooled, g_used, neg, neg_pooled, t)

        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        n = len(prompts)
        texts = (
            prompts,
            prompt_list(prompt_2, n, "prompt_2"),
            prompt_list(negative_prompt, n, "negative_prompt") if want_negative else None,
            prompt_list(negative_prompt_2, n, "negative_prompt_2") if want_negative else None,
        )
        key = tuple(None if x is None else tuple(x) for x in texts) + (g_used, t, want_negative, max_sequence_length)
        return self.cached_condition(
            key, lambda: self._encode_condition(texts, g_used, t, want_negative, max_sequence_length))

    def _encode_condition(self, texts, g_used, t, want_negative, max_sequence_length) -> FluxCondition:
        pos, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts[0], prompt_2=texts[1], device=self.device, max_sequence_length=max_sequence_length
        )
        neg = neg_pooled = None
        if want_negative:
            neg, neg_pooled, _ = self.pipeline.encode_prompt(
                prompt=texts[2], prompt_2=texts[3], device=self.device, max_sequence_length=max_sequence_length
            )
        cond = FluxCondition(pos, pooled, g_used, neg, neg_pooled, t)
        return cond

    # -- velocity ---------------------------------------------------------------------------------------
    def _text_inputs(self, cond: FluxCondition, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, pooled) for ``batch`` latents on the model's device and dtype: [positive; negative] under
        true CFG (made once per condition and batch, :meth:`text_batch`)."""
        device, dtype = self.device, self.dtype
        embeds = repeat_for_batch(cond.prompt_embeds, batch)
        pooled = repeat_for_batch(cond.pooled_prompt_embeds, batch)
        if cond.do_true_cfg:
            embeds = torch.cat([embeds, repeat_for_batch(cond.negative_prompt_embeds, batch)])
            pooled = torch.cat([pooled, repeat_for_batch(cond.negative_pooled_prompt_embeds, batch)])
        return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    def _call(self, tokens, timestep, guidance, embeds, pooled, img_ids):
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=img_ids.dtype)
        return self.transformer(
            hidden_states=tokens,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0].float()

    def velocity(self, x: torch.Tensor, sigma, cond: FluxCondition | None = None, grad: bool = False) -> torch.Tensor:
        """v_theta(x, s, c) on unpacked latents (B, C, h, w); float32."""
        cond = self.velocity_inputs(x, cond)
        batch, _, h, w = x.shape
        device = self.device
        tokens = pack_latents(x.to(device=device, dtype=self.dtype))
        img_ids = latent_image_ids(h // 2, w // 2, device=device, dtype=torch.float32)
        timestep = sigma_batch(sigma, batch, device)
        guidance = None
        if self.has_guidance_embedding:
            value = 3.5 if cond.guidance_scale is None else cond.guidance_scale
            guidance = torch.full((batch,), value, device=device, dtype=torch.float32)
        embeds, pooled = self.text_batch(cond, batch, lambda: self._text_inputs(cond, batch))
        with torch.set_grad_enabled(grad):
            if cond.do_true_cfg:  # one batched call on [positive, negative]
                tokens, timestep = torch.cat([tokens, tokens]), torch.cat([timestep, timestep])
                guidance = None if guidance is None else torch.cat([guidance, guidance])
            v = self._call(tokens, timestep, guidance, embeds, pooled, img_ids)
            if cond.do_true_cfg:
                v, v_neg = v.chunk(2)
                v = classifier_free(v, v_neg, cond.true_cfg_scale)
            v = unpack_latents(v, h, w)
        return v.to(x.device)
