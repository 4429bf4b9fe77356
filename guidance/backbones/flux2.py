"""FLUX.2 [dev] and FLUX.2 [klein] as flow models (Black Forest Labs, 2025, "FLUX.2";
https://github.com/black-forest-labs/flux2; diffusers ``pipelines/flux2/pipeline_flux2.py`` and
``pipeline_flux2_klein.py``).

Backbone conventions handled here and nowhere else:

* the latent every caller sees is the one the pipelines draw their noise in and denoise: the VAE's 32 channels,
  each 2x2 patch folded into channels (B, 32, H/8, W/8) -> (B, 128, H/16, W/16), normalised by the VAE's batch-norm
  running statistics, z = (patchify(E(x)) - mean) / sqrt(var + eps). So ``spatial_factor`` is 16, image sides are
  multiples of 16, and a seed gives the pipeline's starting noise;
* inside :meth:`Flux2Model.velocity` each latent pixel is one token, (B, 128, h, w) -> (B, hw, 128) row-major,
  with 4-axis position ids (t, h, w, l) = (0, row, col, 0) for the image and (0, 0, 0, k) for the k-th text token;
* the transformer takes ``timestep = s`` (the pipeline's scheduler timestep t = 1000 s, cast to the latents' dtype,
  divided by 1000; the transformer multiplies by 1000 itself) and predicts v = eps - x0, the velocity of
  :mod:`guidance.flow`, so no conversion is needed;
* dev (``Flux2Pipeline``, Mistral-Small-3.1 text encoder) is guidance-distilled: ``guidance_scale`` (default 4) is
  fed to the transformer's guidance embedding, there is no negative prompt and no CFG;
* klein (``Flux2KleinPipeline``, Qwen3 text encoder) has no guidance embedding; its base checkpoints use true CFG
  v = v_u + w (v_c - v_u) iff w = ``guidance_scale`` > 1, with the empty prompt (or a given negative prompt) as the
  unconditional half. The pipeline makes two transformer calls; here it is one batched call on [positive, negative]
  (the same result up to float rounding). The step-distilled klein checkpoints (``is_distilled`` in the pipeline
  config) take no CFG at any w;
* text: three hidden states of the text encoder stacked along channels (dev: layers 10, 20, 30; klein: 9, 18, 27),
  through the pipeline's own ``encode_prompt``;
* schedule: linspace(1, 1/N, N) shifted by the scheduler with mu = ``compute_empirical_mu(tokens, N)``, which
  depends on the step count as well as on the image token count, and a final 0.

Reference-image conditioning (FLUX.2's multi-reference editing: the pipelines' ``image`` argument, extra tokens
with time offsets in their ids) is not supported: :meth:`Flux2Model.condition` refuses it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from .autoencoder import LatentCodec
from .base import check_num_steps, repeat_for_batch, sigma_batch
from .mechanics import classifier_free, scheduler_sigmas
from .pipeline import PipelineFlowModel, prompt_list

__all__ = ["Flux2Codec", "Flux2Condition", "Flux2Model", "patchify", "unpatchify", "pack_tokens", "unpack_tokens",
           "latent_ids", "text_ids"]


def patchify(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2): channel 4c + 2a + b holds pixel (2i + a, 2j + b) of channel c."""
    b, c, h, w = latent.shape
    patches = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c, h, w = latent.shape
    pixels = latent.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return pixels.reshape(b, c // 4, h * 2, w * 2)


def pack_tokens(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, hw, C), one token per latent pixel, row-major."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h * w).transpose(1, 2)


def unpack_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_tokens` for a ``height`` x ``width`` latent."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, height, width)


def latent_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """(rows * cols, 4) position ids (t, h, w, l) = (0, row, col, 0) of the image tokens, row-major (int64)."""
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    zeros = torch.zeros_like(r)
    return torch.stack([zeros, r, c, zeros], dim=1).to(device)


def text_ids(length: int, device=None) -> torch.Tensor:
    """(length, 4) position ids (0, 0, 0, k) of the text tokens (int64)."""
    k = torch.arange(length)
    zeros = torch.zeros_like(k)
    return torch.stack([zeros, zeros, zeros, k], dim=1).to(device)


class Flux2Codec(LatentCodec):
    """Images <-> FLUX.2 latents: the VAE's (B, 32, H/8, W/8) latent patchified 2x2 to (B, 128, H/16, W/16) and
    normalised with the VAE's batch-norm running statistics (mean m, variance v, eps from its config)::

        z = (patchify(E(x)) - m) / sqrt(v + eps)          x = D(unpatchify(z sqrt(v + eps) + m))

    as the pipelines' ``_encode_vae_image`` and their final decode do. A separate ``decoder`` / ``encoder``
    (e.g. a tiny autoencoder of the 32-channel latent) is applied to the unnormalised VAE latent with its own
    config's scale and shift; the statistics are always the main VAE's.
    """

    def __init__(self, autoencoder, decoder=None, encoder=None):
        super().__init__(autoencoder, decoder, encoder)
        if not isinstance(getattr(autoencoder, "bn", None), torch.nn.BatchNorm2d):
            raise ValueError(f"{type(autoencoder).__name__} has no batch-norm statistics (bn); FLUX.2 needs its "
                             f"AutoencoderKLFlux2")
        self.vae_channels = self.latent_channels
        self.latent_channels = 4 * self.vae_channels
        self.spatial_factor = 2 * self.spatial_factor
        if autoencoder.bn.num_features != self.latent_channels:
            raise ValueError(f"the VAE's batch norm has {autoencoder.bn.num_features} channels but its "
                             f"{self.vae_channels} latent channels patchify to {self.latent_channels}; "
                             f"the VAE config is inconsistent")

    def statistics(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of shape (1, 128, 1, 1): the batch norm's running mean and sqrt(running_var + eps)."""
        bn = self.autoencoder.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(device=device, dtype=dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.autoencoder.config.batch_norm_eps)
        return mean, std.to(device=device, dtype=dtype)

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (patchify(E(x)) - m) / s; a posterior sample drawn with ``generator``, or its mean (the pipeline's
        ``argmax`` mode) when it is None."""
        latent = patchify(super().encode(image, generator))
        mean, std = self.statistics(latent.device, latent.dtype)
        return (latent - mean) / std

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """x = D(unpatchify(z s + m)), float32, in about [-1, 1] (not clamped)."""
        self.check_latent(latent)
        mean, std = self.statistics(latent.device, torch.float32)
        return self.decode_scaled(unpatchify(latent.float() * std + mean))


@dataclass(frozen=True)
class Flux2Condition:
    """Text conditioning for :class:`Flux2Model`: embeddings of n prompts; ``guidance`` the value fed to dev's
    guidance embedding (None for klein); negatives only when klein's true CFG is active."""

    prompt_embeds: torch.Tensor
    guidance: float | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    guidance_scale: float = 1.0

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def do_cfg(self) -> bool:
        return self.negative_prompt_embeds is not None and self.guidance_scale > 1


class Flux2Model(PipelineFlowModel):
    """Flow-model adapter around a diffusers ``Flux2Pipeline`` (FLUX.2 [dev]) or ``Flux2KleinPipeline``
    (FLUX.2 [klein], base or step-distilled), components used as they are.

    Args:
        pipeline: a ``Flux2Pipeline`` or ``Flux2KleinPipeline``.
        decoder: optional cheaper autoencoder of the 32-channel VAE latent for :meth:`decode`.
        encoder: optional cheaper autoencoder of the 32-channel VAE latent for :meth:`encode`.
    """

    codec_class = Flux2Codec
    condition_type = Flux2Condition

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        self.size_multiple = self.spatial_factor
        side = int(getattr(pipeline, "default_sample_size", 128)) * (self.spatial_factor // 2)  # 1024 px
        self.default_size = (side, side)
        in_channels = int(pipeline.transformer.config.in_channels)
        if self.codec.latent_channels != in_channels:
            raise ValueError(
                f"the VAE has {self.codec.vae_channels} latent channels, patchified 2x2 into "
                f"{self.codec.latent_channels}, but the transformer takes {in_channels}; "
                "the components do not belong together"
            )

    @classmethod
    def from_components(cls, decoder=None, encoder=None, is_distilled: bool | None = None,
                        **components) -> "Flux2Model":
        """Build from ``transformer, scheduler, vae, text_encoder, tokenizer``: a ``Flux2KleinPipeline`` when the
        transformer has no guidance embedding (``is_distilled`` for the step-distilled klein checkpoints), else a
        ``Flux2Pipeline`` (dev)."""
        from diffusers import Flux2KleinPipeline, Flux2Pipeline

        if components["transformer"].config.guidance_embeds:
            if is_distilled is not None:
                raise ValueError("is_distilled applies to FLUX.2 [klein] only; FLUX.2 [dev] takes no such flag")
            return cls(Flux2Pipeline(**components), decoder=decoder, encoder=encoder)
        pipeline = Flux2KleinPipeline(**components, is_distilled=bool(is_distilled))
        return cls(pipeline, decoder=decoder, encoder=encoder)

    @property
    def has_guidance_embedding(self) -> bool:
        """True for dev (guidance-distilled: guidance embedding, no CFG), False for klein."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def is_distilled(self) -> bool:
        """True for the step-distilled klein checkpoints (no CFG; the pipeline config's ``is_distilled``)."""
        return bool(getattr(self.pipeline.config, "is_distilled", False))

    @property
    def takes_cfg(self) -> bool:
        """Whether ``guidance_scale`` > 1 turns on true CFG with a negative prompt (klein base)."""
        return not self.has_guidance_embedding and not self.is_distilled

    # -- geometry and schedule --------------------------------------------------------------------------
    def pipeline_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The state as the pipeline's loop keeps it: one token per latent pixel (B, hw, C), :func:`pack_tokens`."""
        return pack_tokens(x)

    def from_pipeline_latents(self, latents: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return unpack_tokens(latents, like.shape[-2], like.shape[-1])

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """linspace(1, 1/N, N), shifted by the scheduler with mu = compute_empirical_mu(tokens, N), then a final 0."""
        check_num_steps(num_steps)
        h, w = self.latent_grid(height, width)
        return scheduler_sigmas(self.scheduler, num_steps, mu=compute_empirical_mu(h * w, num_steps))

    # -- text -------------------------------------------------------------------------------------------
    def _default_layers(self) -> tuple[int, ...]:
        """The pipeline's default text-encoder layers (dev: 10, 20, 30; klein: 9, 18, 27)."""
        return tuple(inspect.signature(self.pipeline.encode_prompt).parameters["text_encoder_out_layers"].default)

    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = 4.0,
        *,
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image=None,
    ) -> Flux2Condition:
        """Encode prompts once (cached) for :meth:`velocity`.

        dev: ``guidance_scale`` (default 4, the pipeline's) is the embedded guidance value; a negative prompt is
        refused. klein base: ``guidance_scale`` w > 1 turns on true CFG against ``negative_prompt`` (default: the
        empty prompt, as in the pipeline); w <= 1 uses the positive prompt only, and so do the step-distilled klein
        checkpoints at any w. With no text at all (unconditional sampling) CFG is skipped, since both halves would
        be the empty prompt. Precomputed ``prompt_embeds`` (n, L, joint_attention_dim) may replace the prompt.
        ``image`` (reference images for editing) is not supported.
        """
        if image is not None:
            raise ValueError("Flux2Model does not support FLUX.2's reference-image conditioning (image=...); "
                             "condition on text only, or encode the image and use a guidance method instead")
        g = 4.0 if guidance_scale is None else float(guidance_scale)
        if not g >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
        layers = self._default_layers() if text_encoder_out_layers is None else tuple(text_encoder_out_layers)
        empty = negative_prompt is None or negative_prompt == "" or (
            isinstance(negative_prompt, (list, tuple)) and all(p == "" for p in negative_prompt))
        negative_given = negative_prompt_embeds is not None or not empty
        if not self.takes_cfg and negative_given:
            kind = "FLUX.2 [dev] is guidance-distilled" if self.has_guidance_embedding else \
                "this FLUX.2 [klein] checkpoint is step-distilled"
            raise ValueError(f"{kind} and takes no negative prompt (no classifier-free guidance); drop "
                             f"negative_prompt / negative_prompt_embeds")
        text_given = prompt is not None or prompt_embeds is not None or negative_given
        cfg = self.takes_cfg and g > 1 and text_given
        guidance = g if self.has_guidance_embedding else None

        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            self._check_prompt_embeds(prompt_embeds, "prompt_embeds")
            neg = None
            if cfg:
                if negative_prompt_embeds is None:
                    neg_cond = self.condition("" if negative_prompt is None else negative_prompt, guidance_scale=1.0,
                                              max_sequence_length=prompt_embeds.shape[1],
                                              text_encoder_out_layers=layers)
                    neg = repeat_for_batch(neg_cond.prompt_embeds, prompt_embeds.shape[0], "prompt")
                else:
                    neg = negative_prompt_embeds
                self._check_prompt_embeds(neg, "negative_prompt_embeds")
                if neg.shape != prompt_embeds.shape:
                    raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} must have the shape of prompt_embeds "
                                     f"{tuple(prompt_embeds.shape)} (both padded to the same max_sequence_length)")
            return Flux2Condition(prompt_embeds, guidance, neg, g if cfg else 1.0)
        if negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds needs prompt_embeds; pass negative_prompt with a text prompt")

        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        negatives = prompt_list("" if negative_prompt is None else negative_prompt, len(prompts), "negative_prompt")
        texts = (tuple(prompts), tuple(negatives) if cfg else None)
        key = texts + (guidance, g if cfg else 1.0, max_sequence_length, layers)
        return self.cached_condition(
            key, lambda: self._encode_condition(texts, guidance, g if cfg else 1.0, max_sequence_length, layers)
        )

    def _encode(self, prompts, max_sequence_length, layers) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(prompt=list(prompts), device=self.device,
                                                max_sequence_length=max_sequence_length,
                                                text_encoder_out_layers=layers)
        return embeds

    def _encode_condition(self, texts, guidance, w, max_sequence_length, layers) -> Flux2Condition:
        pos = self._encode(texts[0], max_sequence_length, layers)
        neg = None if texts[1] is None else self._encode(texts[1], max_sequence_length, layers)
        return Flux2Condition(pos, guidance, neg, w)

    def _check_prompt_embeds(self, embeds, name: str) -> None:
        """Precomputed text embeddings must be (n, tokens, joint_attention_dim)."""
        dim = int(self.transformer.config.joint_attention_dim)
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != dim:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must have shape (batch, tokens, {dim}) (three stacked text-encoder layers), "
                             f"got {shape}")

    # -- velocity ---------------------------------------------------------------------------------------
    def _text_inputs(self, cond: Flux2Condition, batch: int) -> tuple[torch.Tensor]:
        """(embeddings,) for ``batch`` latents on the model's device and dtype: [positive; negative] under CFG (made
        once per condition and batch, :meth:`text_batch`)."""
        embeds = repeat_for_batch(cond.prompt_embeds, batch)
        if cond.do_cfg:
            embeds = torch.cat([embeds, repeat_for_batch(cond.negative_prompt_embeds, batch)])
        return (embeds.to(device=self.device, dtype=self.dtype),)

    def velocity(self, x: torch.Tensor, sigma, cond: Flux2Condition | None = None, grad: bool = False) -> torch.Tensor:
        """v_theta(x, s, c) on (B, 128, h, w) latents; v_u + w (v_c - v_u) in one batched call under klein's CFG;
        float32."""
        cond = self.velocity_inputs(x, cond)
        batch, _, h, w = x.shape
        device, dtype = self.device, self.dtype
        tokens = pack_tokens(x.to(device=device, dtype=dtype))
        train_steps = float(self.scheduler.config.get("num_train_timesteps", 1000))
        # the pipeline's t / 1000 with t = 1000 s rounded to the latents' dtype first, as the pipeline does
        timestep = (sigma_batch(sigma, batch, device) * train_steps).to(dtype) / 1000
        guidance = None
        if self.has_guidance_embedding:
            value = 4.0 if cond.guidance is None else cond.guidance
            guidance = torch.full((batch,), value, device=device, dtype=torch.float32)
        embeds = self.text_batch(cond, batch, lambda: self._text_inputs(cond, batch))[0]
        if cond.do_cfg:  # one batched call on [positive, negative]
            tokens, timestep = torch.cat([tokens, tokens]), torch.cat([timestep, timestep])
        with torch.set_grad_enabled(grad):
            v = self.transformer(
                hidden_states=tokens,
                encoder_hidden_states=embeds,
                timestep=timestep,
                img_ids=latent_ids(h, w, device),
                txt_ids=text_ids(embeds.shape[1], device),
                guidance=guidance,
                return_dict=False,
            )[0].float()
            if cond.do_cfg:
                v_c, v_u = v.chunk(2)
                v = classifier_free(v_c, v_u, cond.guidance_scale)
            v = unpack_tokens(v, h, w)
        return v.to(x.device)
