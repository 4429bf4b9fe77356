"""Lumina-Image 2.0 as a flow model: the Unified Next-DiT over FLUX.1-style VAE latents, Gemma 2 text features.

Qin et al., "Lumina-Image 2.0: A Unified and Efficient Image Generative Framework" (2025),
https://github.com/Alpha-VLLM/Lumina-Image-2.0; diffusers ``pipelines/lumina2/pipeline_lumina2.py``.

Backbone conventions handled here and nowhere else:

* latents are seen by every caller as (B, 16, H/8, W/8), the layout in which the pipeline draws its noise and
  which the transformer takes (it patchifies 2x2 inside);
* time runs the other way: the transformer takes t = 1 - (1000 s) / 1000 (0 = noise, 1 = data) and predicts
  x0 - eps, the negated velocity; here v = -output, so that v = eps - x0 as everywhere in flowsteer;
* text: Gemma 2's second-to-last hidden states of ``system_prompt + " <Prompt Start> " + prompt``, padded to
  ``max_sequence_length`` with the attention mask the transformer takes; the negative prompt gets no system prompt
  (the pipeline's rule; default the empty string);
* classifier-free guidance, active iff w = ``guidance_scale`` > 1: v = v_u + w (v_c - v_u), one batched call on
  [positive, negative] where the pipeline makes two; with ``cfg_normalization`` (on by default) the guided
  velocity is rescaled to the norm of v_c along the last axis of the (B, C, h, w) latent, as the pipeline does
  (along image columns, not per token);
* ``cfg_trunc_ratio`` r < 1 drops guidance at the steps i with (i + 1) / N > r: a function of the step index, so
  the condition takes the step count N and turns the rule into one on s (guidance where s >= s_k, the last
  guided step's sigma of the N-step schedule), which the sampler's steps meet exactly;
* schedule: ``linspace(1, 1/N, N)`` through the scheduler and a final 0; the pipeline computes mu from
  ``latents.shape[1]``, the channel count (16), not the image token count, so a dynamically shifting scheduler
  gives the same schedule at every size; that rule is followed (the released scheduler shifts statically by 6);
* latents z = (E(x) - shift) * scale with the VAE config's factors (FLUX.1's 0.3611, 0.1159); image sides are
  multiples of 16 (the pipeline's fixed vae factor 8 times the patch size 2) and at most the rotary tables' length
  in patches (8192 px released); the native size is the transformer's ``sample_size`` times 8 (1024 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import check_num_steps, repeat_for_batch, sigma_batch
from .mechanics import classifier_free, rescale_to_norm, scheduler_sigmas, token_shift
from .pipeline import PipelineFlowModel, prompt_list
from .z_image import rope_max_size

__all__ = ["Lumina2Condition", "Lumina2Model"]


@dataclass(frozen=True)
class Lumina2Condition:
    """Text conditioning for :class:`Lumina2Model`: embeddings (n, L, D) and attention masks (n, L) of n prompts,
    and of their negatives when guidance is active (w > 1). ``cfg_sigma_floor``: guidance only where s >= it
    (from ``cfg_trunc_ratio``; None: at every s)."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    guidance_scale: float
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_attention_mask: torch.Tensor | None = None
    cfg_normalization: bool = True
    cfg_sigma_floor: float | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1 and self.negative_prompt_embeds is not None


class Lumina2Model(PipelineFlowModel):
    """Flow-model adapter around a diffusers ``Lumina2Pipeline`` (components used as they are).

    Args:
        pipeline: a ``Lumina2Pipeline`` (Lumina-Image 2.0 checkpoint).
        decoder: optional cheaper autoencoder for :meth:`decode` (e.g. TAEF1: the VAE is FLUX.1's).
        encoder: optional cheaper autoencoder for :meth:`encode` (e.g. TAEF1).
    """

    pipeline_class = "Lumina2Pipeline"
    condition_type = Lumina2Condition

    #: Lumina 2's transformer holds its repeated blocks here (refiners and joint layers).
    repeated_blocks = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        config = pipeline.transformer.config
        self.patch_size = int(config.patch_size)
        self.latent_multiple = self.patch_size
        if self.spatial_factor != pipeline.vae_scale_factor:
            raise ValueError(f"the VAE scales by {self.spatial_factor} but Lumina2Pipeline assumes "
                             f"{pipeline.vae_scale_factor}; use an autoencoder made for this model")
        self.size_multiple = 2 * self.spatial_factor  # the pipeline's rule (vae factor x 2)
        side = int(config.sample_size) * self.spatial_factor
        self.default_size = (side, side)
        self.max_size = rope_max_size(config.axes_lens, self.patch_size, self.spatial_factor)
        self.check_latent_channels(config.in_channels)

    # -- geometry and schedule --------------------------------------------------------------------------
    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """linspace(1, 1/N, N) through the scheduler with mu = the shift line at the latent channel count (the
        pipeline's rule), then a final 0; the same at every image size."""
        check_num_steps(num_steps)
        self.latent_shape(height or self.default_size[0], width or self.default_size[1])
        mu = token_shift(self.scheduler.config, self.codec.latent_channels)
        return scheduler_sigmas(self.scheduler, num_steps, mu)

    def _sigma_floor(self, ratio: float, num_steps: int | None) -> float | None:
        """The sigma of the last step i of an N-step run with (i + 1) / N <= ``ratio`` (inf: none), None for r >= 1."""
        if ratio >= 1:
            return None
        if num_steps is None:
            raise ValueError(f"cfg_trunc_ratio={ratio} < 1 depends on the step index: pass num_steps (the sampler's "
                             f"step count) to condition(), or cfg_trunc_ratio=1.0")
        check_num_steps(num_steps)
        guided = sum(1 for i in range(num_steps) if not (i + 1) / num_steps > ratio)
        return float(self.sigmas(num_steps)[guided - 1]) if guided else math.inf

    # -- text -------------------------------------------------------------------------------------------
    def _check_embeds(self, embeds, mask, name: str, mask_name: str) -> None:
        """Precomputed text embeddings (n, tokens, cap_feat_dim) with their attention masks (n, tokens)."""
        width = int(self.transformer.config.cap_feat_dim)
        if embeds is None or mask is None:
            raise ValueError(f"{name} and {mask_name} must be given together")
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            shape = tuple(getattr(embeds, "shape", ()))
            raise ValueError(f"{name} must have shape (batch, tokens, {width}), got {shape}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"{mask_name} must have shape {tuple(embeds.shape[:2])} (one entry per token of "
                             f"{name}), got {tuple(getattr(mask, 'shape', ()))}")

    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = 4.0,
        *,
        cfg_normalization: bool = True,
        cfg_trunc_ratio: float = 1.0,
        num_steps: int | None = None,
        system_prompt: str | None = None,
        max_sequence_length: int = 256,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> Lumina2Condition:
        """Encode prompts once (cached) for :meth:`velocity`.

        ``guidance_scale`` w > 1 turns on classifier-free guidance against ``negative_prompt`` (default: the empty
        prompt); ``cfg_normalization`` rescales the guided velocity to the conditional one's norm (the pipeline's
        default, on). ``cfg_trunc_ratio`` r < 1 keeps guidance for the first r N of ``num_steps`` = N steps only
        (N is required then). ``system_prompt`` replaces the pipeline's. Precomputed ``prompt_embeds``
        (n, tokens, cap_feat_dim) with ``prompt_attention_mask`` (n, tokens) may replace the prompt.
        """
        g = 4.0 if guidance_scale is None else float(guidance_scale)
        if not g >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 or less disables classifier-free guidance), got "
                             f"{guidance_scale}")
        ratio = float(cfg_trunc_ratio)
        if not ratio >= 0:
            raise ValueError(f"cfg_trunc_ratio must be >= 0 (1 keeps guidance at every step), got {cfg_trunc_ratio}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an integer from 1 to 512 (Lumina 2's limit), got "
                             f"{max_sequence_length!r}")
        do_cfg = g > 1
        floor = self._sigma_floor(ratio, num_steps) if do_cfg else None
        norm = bool(cfg_normalization)
        if prompt_embeds is not None or prompt_attention_mask is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            self._check_embeds(prompt_embeds, prompt_attention_mask, "prompt_embeds", "prompt_attention_mask")
            neg = neg_mask = None
            if do_cfg:
                if negative_prompt_embeds is None and negative_prompt_attention_mask is None:
                    texts = prompt_list("" if negative_prompt is None else negative_prompt, prompt_embeds.shape[0],
                                        "negative_prompt")
                    neg, neg_mask = self._encode_plain(texts, prompt_embeds.shape[1])
                else:
                    neg, neg_mask = negative_prompt_embeds, negative_prompt_attention_mask
                self._check_embeds(neg, neg_mask, "negative_prompt_embeds", "negative_prompt_attention_mask")
                if neg.shape != prompt_embeds.shape:
                    raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} must have the shape of prompt_embeds "
                                     f"{tuple(prompt_embeds.shape)}")
            return Lumina2Condition(prompt_embeds, prompt_attention_mask, g, neg, neg_mask, norm, floor)

        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        negatives = prompt_list(negative_prompt, len(prompts), "negative_prompt") if do_cfg else None
        key = (tuple(prompts), None if negatives is None else tuple(negatives), do_cfg, system_prompt,
               max_sequence_length)
        pos, mask, neg, neg_mask = self.cached_condition(
            key, lambda: self._encode_condition(prompts, negatives, do_cfg, system_prompt, max_sequence_length))
        return Lumina2Condition(pos, mask, g, neg, neg_mask, norm, floor)

    def _encode_condition(self, prompts, negatives, do_cfg, system_prompt, max_sequence_length):
        """The pipeline's own encode_prompt: (embeds, mask, negative embeds, negative mask)."""
        return self.pipeline.encode_prompt(
            list(prompts), do_cfg, negative_prompt=None if negatives is None else list(negatives),
            device=self.device, system_prompt=system_prompt, max_sequence_length=max_sequence_length,
        )

    def _encode_plain(self, texts, length):
        """Gemma features of ``texts`` as they are (no system prompt: the pipeline's rule for negatives)."""
        return self.pipeline._get_gemma_prompt_embeds(list(texts), device=self.device, max_sequence_length=length)

    # -- velocity ---------------------------------------------------------------------------------------
    def _call(self, x, timestep, embeds, mask) -> torch.Tensor:
        dtype, device = self.dtype, self.device
        return self.transformer(
            hidden_states=x.to(device=device, dtype=dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.to(device=device, dtype=dtype),
            encoder_attention_mask=mask.to(device),
            return_dict=False,
        )[0].float()

    def _text_inputs(self, cond: Lumina2Condition, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, attention mask) for ``batch`` latents on the model's device, the embeddings in its dtype:
        [positive; negative] under CFG, whose first ``batch`` rows serve the steps CFG skips (made once per condition
        and batch, :meth:`text_batch`)."""
        embeds = repeat_for_batch(cond.prompt_embeds, batch, "prompt")
        mask = repeat_for_batch(cond.prompt_attention_mask, batch, "prompt")
        if cond.do_cfg:
            embeds = torch.cat([embeds, repeat_for_batch(cond.negative_prompt_embeds, batch, "prompt")])
            mask = torch.cat([mask, repeat_for_batch(cond.negative_prompt_attention_mask, batch, "prompt")])
        return embeds.to(device=self.device, dtype=self.dtype), mask.to(self.device)

    def velocity(self, x: torch.Tensor, sigma, cond: Lumina2Condition | None = None, grad: bool = False
                 ) -> torch.Tensor:
        """v_theta(x, s, c) = -transformer(x, 1 - (1000 s) / 1000, c) on latents (B, C, h, w); float32."""
        cond = self.velocity_inputs(x, cond)
        batch = x.shape[0]
        device = self.device
        s = sigma_batch(sigma, batch, device)
        steps = float(self.scheduler.config.num_train_timesteps)
        timestep = 1 - (s * steps) / steps  # the pipeline's arithmetic
        # per sample, where CFG is truncated (one host read per step); without truncation no test is read
        guided = s >= cond.cfg_sigma_floor if cond.do_cfg and cond.cfg_sigma_floor is not None else None
        embeds, mask = self.text_batch(cond, batch, lambda: self._text_inputs(cond, batch))
        with torch.set_grad_enabled(grad):
            if not cond.do_cfg or (guided is not None and not bool(guided.any())):
                v = -self._call(x, timestep, embeds[:batch], mask[:batch])
            else:  # one batched call on [positive, negative]
                out = self._call(torch.cat([x, x]), torch.cat([timestep, timestep]), embeds, mask)
                v_pos, v_neg = (-out).chunk(2)
                v = classifier_free(v_pos, v_neg, cond.guidance_scale)
                if cond.cfg_normalization:
                    v = rescale_to_norm(v, v_pos, dim=-1)
                if guided is not None:
                    v = torch.where(guided[:, None, None, None], v, v_pos)
        return v.to(x.device)
