"""Chroma (Chroma1-HD / Chroma1-Base, a FLUX.1-schnell-derived 8.9B transformer) as a flow model.

Reference: lodestones, "Chroma" (https://huggingface.co/lodestones/Chroma1-HD, official code
https://github.com/lodestone-rock/flow); diffusers ``pipelines/chroma/pipeline_chroma.py``.

Backbone conventions handled here and nowhere else:

* latents are seen by every caller as ordinary (B, C, H/8, W/8) tensors, the layout in which the pipeline draws
  its noise; inside, each 2x2 latent patch becomes one token (FLUX.1's packing,
  :func:`~guidance.backbones.flux.pack_latents`), with image position ids [0, row, col] and zero text ids, and the
  transformer's output is unpacked back;
* the transformer takes ``timestep = s`` (the pipeline passes the scheduler's ``1000 s`` divided by 1000; the
  transformer multiplies by 1000 itself) and predicts v = eps - x0, flowsteer's convention, so no conversion;
* text: T5 only (no CLIP, no pooled projection). T5 runs with the tokenizer's attention mask; the transformer
  gets a mask over [text tokens, image tokens] that keeps the prompt's tokens, its first padding token and every
  image token. The mask is passed exactly as the pipeline passes it: a 0/1 tensor in floating point, which the
  attention adds to its logits, so padding is damped (weight e^0 against e^1) rather than removed as in the
  official code;
* no guidance embedding: the "distilled guidance" approximator maps the timestep alone (its guidance input is
  fixed to 0) to every block's modulation, so there is no guidance value to set;
* true classifier-free guidance v = v_u + w (v_c - v_u) with ``guidance_scale`` w (default 5), active iff w > 1,
  against the negative prompt (the empty prompt when none is given). The pipeline makes two transformer calls;
  here it is one batched call on [positive, negative] (the same result up to float rounding);
* schedule: linspace(1, 1/N, N) through the scheduler with mu from the image token count (FLUX.1's rule), then 0;
* latents z = (E(x) - shift) * scale with the VAE config's factors (FLUX.1's VAE: 0.3611, 0.1159); image sides
  are multiples of 2 * vae factor (16);
* diffusers' transformer drops the attention mask of its single-stream blocks when gradient checkpointing is on;
  :meth:`ChromaModel.velocity` hands it back for the call, so checkpointed and plain gradients agree.

``ChromaPipeline``, ``ChromaImg2ImgPipeline`` and ``ChromaInpaintPipeline`` hold the same components (the same
transformer, VAE, T5 and scheduler), so any of them can be wrapped for text-to-image use.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .base import repeat_for_batch, sigma_batch
from .flux import FluxModel, PackedLatents, latent_image_ids, pack_latents, unpack_latents
from .mechanics import classifier_free
from .pipeline import PipelineFlowModel, prompt_list

__all__ = ["ChromaCondition", "ChromaModel"]

#: The pipeline's default CFG weight.
DEFAULT_GUIDANCE = 5.0


@dataclass(frozen=True)
class ChromaCondition:
    """Text conditioning for :class:`ChromaModel`: T5 embeddings (n, L, D) of n prompts with their transformer
    attention masks (n, L) (1 on the prompt's tokens and its first padding token, 0 elsewhere), and those of the
    negative prompts when CFG is active (w > 1)."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    guidance_scale: float
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_attention_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1 and self.negative_prompt_embeds is not None


@contextlib.contextmanager
def _mask_through_checkpointing(transformer, mask: torch.Tensor):
    """While gradient checkpointing is on, diffusers' ChromaTransformer2DModel calls its single-stream blocks as
    ``checkpoint(block, hidden_states, temb, rotary)`` and so drops ``attention_mask``; inside the block the mask
    is added back to those calls (the double-stream blocks already get it)."""
    func = getattr(transformer, "_gradient_checkpointing_func", None)
    if func is None or not transformer.is_gradient_checkpointing or not torch.is_grad_enabled():
        yield
        return
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

    def with_mask(block, *args):
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:
            args = (*args, mask)
        return func(block, *args)

    transformer._gradient_checkpointing_func = with_mask
    try:
        yield
    finally:
        transformer._gradient_checkpointing_func = func


class ChromaModel(PackedLatents, PipelineFlowModel):
    """Flow-model adapter around a diffusers ``ChromaPipeline`` (or ``ChromaImg2ImgPipeline`` /
    ``ChromaInpaintPipeline``, which hold the same components), its components used as they are.

    Args:
        pipeline: a ``ChromaPipeline`` (Chroma1-HD, Chroma1-Base, ...).
        decoder: optional cheaper autoencoder for :meth:`decode` (e.g. TAEF1, made for FLUX.1's VAE).
        encoder: optional cheaper autoencoder for :meth:`encode` (e.g. TAEF1).
    """

    pipeline_class = "ChromaPipeline"
    condition_type = ChromaCondition
    latent_multiple = 2

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        self.size_multiple = 2 * self.spatial_factor
        side = 128 * self.spatial_factor  # the pipeline's default_sample_size (1024 px)
        self.default_size = (side, side)
        self.check_latent_channels(pipeline.transformer.config.in_channels, packed=4)

    # -- geometry and schedule --------------------------------------------------------------------------
    #: FLUX.1's schedule: linspace(1, 1/N, N) shifted with mu from the packed token count, then a final 0
    sigmas = FluxModel.sigmas

    # -- text -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = DEFAULT_GUIDANCE,
        *,
        max_sequence_length: int = 512,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> ChromaCondition:
        """Encode prompts once (cached per prompts and settings) for :meth:`velocity`.

        ``guidance_scale`` w is the CFG weight (default 5, the pipeline's); w <= 1 uses the positive prompt only.
        An omitted negative prompt is the empty one, as in the pipeline; with no text at all (unconditional
        sampling) CFG is skipped, since both halves would be the empty prompt. Precomputed ``prompt_embeds``
        (n, L, joint_attention_dim) with their ``prompt_attention_mask`` (n, L), as the pipeline's
        ``encode_prompt`` returns them, may replace the prompt; a mask is always applied as the pipeline applies its
        own (0/1 values in floating point), whatever its dtype.
        """
        w = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        if not w >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 or less disables guidance), got {guidance_scale}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an integer in [1, 512] (T5's limit in Chroma), "
                             f"got {max_sequence_length!r}")
        given = (prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds)
        if all(t is None for t in given):
            w = min(w, 1.0)  # no text at all: CFG would compare the empty prompt with itself
        if prompt_embeds is not None or prompt_attention_mask is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            return self._condition_from_embeds(prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                                               negative_prompt_attention_mask, w, negative_prompt)
        if negative_prompt_embeds is not None or negative_prompt_attention_mask is not None:
            raise ValueError("negative_prompt_embeds need prompt_embeds; pass prompt_embeds with "
                             "prompt_attention_mask, or use negative_prompt with a text prompt")
        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        negatives = prompt_list(negative_prompt or "", len(prompts), "negative_prompt") if w > 1 else None
        key = (tuple(prompts), None if negatives is None else tuple(negatives), w, max_sequence_length)
        return self.cached_condition(key, lambda: self._encode_condition(prompts, negatives, w, max_sequence_length))

    def _encode_condition(self, prompts, negatives, w, max_sequence_length) -> ChromaCondition:
        pos, _, pos_mask, neg, _, neg_mask = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=negatives,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=w > 1,
            max_sequence_length=max_sequence_length,
        )
        return ChromaCondition(pos, pos_mask, w, neg if w > 1 else None, neg_mask if w > 1 else None)

    def _check_text(self, embeds, mask, name: str, mask_name: str) -> None:
        """Embeddings (n, L, joint_attention_dim) with a mask (n, L), as ``encode_prompt`` returns them."""
        width = int(self.transformer.config.joint_attention_dim)
        if embeds is None or mask is None:
            raise ValueError(f"{name} and {mask_name} must be given together (both come from the pipeline's "
                             f"encode_prompt)")
        if embeds.ndim != 3 or embeds.shape[-1] != width:
            raise ValueError(f"{name} must have shape (batch, tokens, {width}), got {tuple(embeds.shape)}")
        if tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"{mask_name} must have shape {tuple(embeds.shape[:2])} (batch, tokens of {name}), "
                             f"got {tuple(mask.shape)}")

    def _condition_from_embeds(self, pos, pos_mask, neg, neg_mask, w, negative_prompt) -> ChromaCondition:
        self._check_text(pos, pos_mask, "prompt_embeds", "prompt_attention_mask")
        if w <= 1:
            return ChromaCondition(pos, pos_mask, w)
        if neg is None and neg_mask is None:
            n = pos.shape[0]
            neg_cond = self.condition(negative_prompt or "", guidance_scale=1.0, max_sequence_length=pos.shape[1])
            neg = repeat_for_batch(neg_cond.prompt_embeds, n, "prompt")
            neg_mask = repeat_for_batch(neg_cond.prompt_attention_mask, n, "prompt")
        self._check_text(neg, neg_mask, "negative_prompt_embeds", "negative_prompt_attention_mask")
        if neg.shape != pos.shape:
            raise ValueError(
                f"negative_prompt_embeds {tuple(neg.shape)} must have the shape of prompt_embeds {tuple(pos.shape)}"
            )
        return ChromaCondition(pos, pos_mask, w, neg, neg_mask)

    # -- velocity ---------------------------------------------------------------------------------------
    def _text_inputs(self, cond: ChromaCondition, batch: int, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, joint attention mask) for ``batch`` latents of ``image_tokens`` tokens, on the model's device
        and dtype: [positive; negative] under CFG (made once per condition, batch and size, :meth:`text_batch`)."""
        device, dtype = self.device, self.dtype
        embeds = repeat_for_batch(cond.prompt_embeds, batch)
        text_mask = repeat_for_batch(cond.prompt_attention_mask, batch)
        if cond.do_cfg:
            embeds = torch.cat([embeds, repeat_for_batch(cond.negative_prompt_embeds, batch)])
            text_mask = torch.cat([text_mask, repeat_for_batch(cond.negative_prompt_attention_mask, batch)])
        text_mask = text_mask.to(device=device, dtype=dtype)
        # [text, image] order of the joint sequence; every image token is kept (weight 1, as in the pipeline)
        mask = torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], image_tokens)], dim=1)
        return embeds.to(device=device, dtype=dtype), mask

    def velocity(self, x: torch.Tensor, sigma, cond: ChromaCondition | None = None, grad: bool = False
                 ) -> torch.Tensor:
        """v = v_u + w (v_c - v_u) (one batched transformer call) or v_c when w <= 1, on unpacked latents
        (B, C, h, w); float32."""
        cond = self.velocity_inputs(x, cond)
        batch, _, h, w = x.shape
        device, dtype = self.device, self.dtype
        tokens = pack_latents(x.to(device=device, dtype=dtype))
        img_ids = latent_image_ids(h // 2, w // 2, device=device, dtype=torch.float32)
        timestep = sigma_batch(sigma, batch, device)
        image_tokens = tokens.shape[1]
        embeds, mask = self.text_batch(cond, batch, lambda: self._text_inputs(cond, batch, image_tokens), image_tokens)
        with torch.set_grad_enabled(grad):
            if cond.do_cfg:  # one batched call on [positive, negative]
                tokens, timestep = torch.cat([tokens, tokens]), torch.cat([timestep, timestep])
            txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=img_ids.dtype)
            with _mask_through_checkpointing(self.transformer, mask):
                v = self.transformer(
                    hidden_states=tokens,
                    timestep=timestep,
                    encoder_hidden_states=embeds,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    attention_mask=mask,
                    return_dict=False,
                )[0].float()
            if cond.do_cfg:
                v_c, v_u = v.chunk(2)
                v = classifier_free(v_c, v_u, cond.guidance_scale)
            v = unpack_latents(v, h, w)
        return v.to(x.device)
