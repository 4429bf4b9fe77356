"""Stable Diffusion 3 / 3.5 as a flow model (MMDiT transformer over 16-channel VAE latents).

Backbone conventions handled here and nowhere else:

* the transformer takes ``timestep = 1000 * s`` (the scheduler's ``num_train_timesteps``);
* classifier-free guidance is one batched call on [negative, positive]:
  v = v_u + w (v_c - v_u), active iff w > 1 (w <= 1 uses the positive prompt only, as the pipeline does);
* text: CLIP-L and CLIP-G hidden states, zero-padded to T5's width and stacked with T5's tokens; pooled CLIP
  projections concatenated. T5 is optional (zeros in its place when the pipeline has none);
* latents z = (E(x) - shift) * scale with the VAE config's factors; image sides are multiples of
  ``vae factor * patch size`` (16 for the released models) and at most ``pos_embed_max_size`` patches (SD3:
  96 -> 1536 px; SD3.5: 384 -> 6144 px), the largest position embedding the transformer holds.

SD3.5's dual-attention and qk-norm transformers take the same inputs and run through the same path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import check_num_steps, repeat_for_batch, sigma_batch
from .mechanics import classifier_free, scheduler_sigmas, token_shift
from .pipeline import PipelineFlowModel, prompt_list

__all__ = ["SD3Condition", "SD3Model"]

@dataclass(frozen=True)
class SD3Condition:
    """Text conditioning for :class:`SD3Model`: embeddings of n prompts (and of their negatives when w > 1)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    guidance_scale: float

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1


class SD3Model(PipelineFlowModel):
    """Flow-model adapter around a diffusers ``StableDiffusion3Pipeline`` (its components are used as they are:
    dtype, device, offloading and quantization stay the user's).

    Args:
        pipeline: a ``StableDiffusion3Pipeline`` (or any pipeline with the same components).
        decoder: optional cheaper autoencoder for :meth:`decode` (e.g. TAESD3).
        encoder: optional cheaper autoencoder for :meth:`encode` (e.g. TAESD3).
    """

    pipeline_class = "StableDiffusion3Pipeline"
    cfg_in_batch = True
    condition_type = SD3Condition

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        config = pipeline.transformer.config
        self.patch_size = int(config.patch_size)
        self.size_multiple = self.spatial_factor * self.patch_size
        side = int(config.sample_size) * self.spatial_factor
        self.default_size = (side, side)
        max_patches = getattr(config, "pos_embed_max_size", None)
        if max_patches:
            self.max_size = int(max_patches) * self.size_multiple
        self.check_latent_channels(config.in_channels)

    @classmethod
    def from_components(cls, decoder=None, encoder=None, **components) -> "SD3Model":
        """Build from ``transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
        text_encoder_3, tokenizer_3`` (the last two may be None: no T5)."""
        components.setdefault("text_encoder_3", None)
        components.setdefault("tokenizer_3", None)
        return super().from_components(decoder=decoder, encoder=encoder, **components)

    # -- geometry and schedule --------------------------------------------------------------------------

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The pipeline's schedule: the scheduler's ``set_timesteps`` (static shift 3 for the released models,
        or a dynamic shift from the image token count when configured), run on a copy; a final 0 included."""
        check_num_steps(num_steps)
        mu = None
        if self.scheduler.config.get("use_dynamic_shifting", False):
            height = height or self.default_size[0]
            width = width or self.default_size[1]
            _, h, w = self.latent_shape(height, width)
            mu = token_shift(self.scheduler.config, (h // self.patch_size) * (w // self.patch_size), max_shift=1.16)
        return scheduler_sigmas(self.scheduler, num_steps, mu, linspace=False)

    # -- text -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = 7.0,
        *,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        max_sequence_length: int = 256,
        clip_skip: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> SD3Condition:
        """Encode prompts once (cached per prompts and settings) for :meth:`velocity`.

        ``guidance_scale`` w is the CFG weight (default 7, the pipeline's); w <= 1 disables CFG. Precomputed
        ``prompt_embeds`` (n, L, joint_attention_dim) with ``pooled_prompt_embeds`` (n, pooled_projection_dim)
        may replace the prompt. An omitted negative prompt is the empty string, as in the pipeline; with no
        text at all (unconditional sampling) CFG is skipped, since both halves would be the empty prompt.
        """
        w = 7.0 if guidance_scale is None else float(guidance_scale)
        if not w >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 or less disables guidance), got {guidance_scale}")
        texts_given = (prompt, prompt_2, prompt_3, negative_prompt, negative_prompt_2, negative_prompt_3)
        if prompt_embeds is None and pooled_prompt_embeds is None and all(t is None for t in texts_given):
            w = min(w, 1.0)  # no text at all: CFG would compare the empty prompt with itself
        if prompt_embeds is not None or pooled_prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            return self._condition_from_embeds(
                prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds, w,
                negative_prompt, negative_prompt_2, negative_prompt_3, max_sequence_length,
            )
        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        n = len(prompts)
        texts = (
            prompts,
            prompt_list(prompt_2, n, "prompt_2"),
            prompt_list(prompt_3, n, "prompt_3"),
            prompt_list(negative_prompt, n, "negative_prompt"),
            prompt_list(negative_prompt_2, n, "negative_prompt_2"),
            prompt_list(negative_prompt_3, n, "negative_prompt_3"),
        )
        key = tuple(None if t is None else tuple(t) for t in texts) + (w > 1, w, max_sequence_length, clip_skip)
        return self.cached_condition(key, lambda: self._encode_condition(texts, w, max_sequence_length, clip_skip))

    def _encode_condition(self, texts, w, max_sequence_length, clip_skip) -> SD3Condition:
        pos, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=texts[0],
            prompt_2=texts[1],
            prompt_3=texts[2],
            negative_prompt=texts[3],
            negative_prompt_2=texts[4],
            negative_prompt_3=texts[5],
            do_classifier_free_guidance=w > 1,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
            clip_skip=clip_skip,
        )
        cond = SD3Condition(pos, pooled, neg if w > 1 else None, neg_pooled if w > 1 else None, w)
        return cond

    def _condition_from_embeds(self, pos, pooled, neg, neg_pooled, w, negative_prompt, negative_prompt_2,
                               negative_prompt_3, max_sequence_length) -> SD3Condition:
        self._check_embeds(pos, pooled, "prompt_embeds", "pooled_prompt_embeds")
        if w > 1:
            if neg is None and neg_pooled is None:
                n = pos.shape[0]
                neg_cond = self.condition(
                    "" if negative_prompt is None else negative_prompt,
                    guidance_scale=1.0,
                    prompt_2=negative_prompt_2,
                    prompt_3=negative_prompt_3,
                    max_sequence_length=max_sequence_length,
                )
                neg = repeat_for_batch(neg_cond.prompt_embeds, n, "prompt")
                neg_pooled = repeat_for_batch(neg_cond.pooled_prompt_embeds, n, "prompt")
            self._check_embeds(neg, neg_pooled, "negative_prompt_embeds", "negative_pooled_prompt_embeds")
            if neg.shape != pos.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(neg.shape)} must have the shape of prompt_embeds {tuple(pos.shape)}"
                )
        else:
            neg = neg_pooled = None
        return SD3Condition(pos, pooled, neg, neg_pooled, w)

    # -- velocity ---------------------------------------------------------------------------------------
    def _text_inputs(self, cond: SD3Condition, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, pooled) for ``batch`` latents on the model's device and dtype: [negative; positive] under
        CFG (made once per condition and batch, :meth:`text_batch`)."""
        device, dtype = self.device, self.dtype
        embeds = repeat_for_batch(cond.prompt_embeds, batch)
        pooled = repeat_for_batch(cond.pooled_prompt_embeds, batch)
        if cond.do_cfg:
            embeds = torch.cat([repeat_for_batch(cond.negative_prompt_embeds, batch), embeds])
            pooled = torch.cat([repeat_for_batch(cond.negative_pooled_prompt_embeds, batch), pooled])
        return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    def velocity(self, x: torch.Tensor, sigma, cond: SD3Condition | None = None, grad: bool = False) -> torch.Tensor:
        """v = v_u + w (v_c - v_u) (one batched transformer call) or v_c when w <= 1; float32 like ``x``."""
        cond = self.velocity_inputs(x, cond)
        batch = x.shape[0]
        device, dtype = self.device, self.dtype
        scale = float(self.scheduler.config.get("num_train_timesteps", 1000))
        timestep = sigma_batch(sigma, batch, device) * scale
        embeds, pooled = self.text_batch(cond, batch, lambda: self._text_inputs(cond, batch))
        hidden = x.to(device=device, dtype=dtype)
        if cond.do_cfg:
            hidden = torch.cat([hidden, hidden])
            timestep = torch.cat([timestep, timestep])
        with torch.set_grad_enabled(grad):
            out = self.transformer(
                hidden_states=hidden,
                timestep=timestep,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0].float()
            if cond.do_cfg:
                v_u, v_c = out.chunk(2)
                out = classifier_free(v_c, v_u, cond.guidance_scale)
        return out.to(x.device)
