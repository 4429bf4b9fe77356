"""Qwen-Image as a flow model (a 60-block dual-stream MMDiT over the latents of a causal 3D VAE, prompted by
Qwen2.5-VL).

Qwen-Image Technical Report (Wu et al., 2025, arXiv:2508.02324), https://github.com/QwenLM/Qwen-Image; the oracle
is diffusers' ``pipelines/qwenimage/pipeline_qwenimage.py`` (``QwenImagePipeline``).

Backbone conventions handled here and nowhere else:

* the VAE (``AutoencoderKLQwenImage``) is a video VAE used with one frame: it takes (B, 3, 1, H, W) and gives
  (B, 16, 1, H/8, W/8). Every caller sees ordinary (B, 16, H/8, W/8) latents; the frame axis is added and removed
  inside. The pipeline draws its noise as (B, 1, 16, h, w), which has the memory layout of (B, 16, h, w), so one
  seed gives the same starting latents;
* latents are normalised per channel with the VAE config's statistics: z = (E(x) - mean_c) / std_c, and
  x = D(z std_c + mean_c) (the decoder clamps its output to [-1, 1]);
* each 2x2 latent patch becomes one token, (B, C, h, w) -> (B, (h/2)(w/2), 4C), in FLUX's layout (channel-major
  within a token, :func:`~guidance.backbones.flux.pack_latents`), with ``img_shapes = (1, h/2, w/2)`` for the
  transformer's 3D rotary embedding; the output is unpacked back. Packing is a permutation, so an Euler step on
  the unpacked latent equals the pipeline's step on packed tokens;
* the transformer takes ``timestep = s`` (the pipeline passes t / 1000 with t = 1000 s) and predicts the velocity
  eps - x0 of this package's convention; nothing is converted;
* text: the prompt goes into the pipeline's chat template, Qwen2.5-VL's last hidden states are taken and the
  template's first 34 tokens (``prompt_template_encode_start_idx``, its system part) dropped, by the pipeline's own
  ``encode_prompt``. Prompts of a batch are zero-padded to the longest, with an attention mask over the text
  tokens (None when nothing is padded, as in the pipeline);
* true classifier-free guidance, active iff ``true_cfg_scale`` t > 1 and a negative prompt is given (the pipeline's
  rule; default t = 4): v_g = v_neg + t (v_pos - v_neg), then every token's guided velocity is rescaled to the
  norm of its conditional one, v = v_g |v_pos| / |v_g| (norms over the 4C channels of a packed token). The pipeline
  makes two transformer calls; here it is one batched call on [positive, negative], the shorter text zero-padded
  and masked (the same result up to float rounding);
* ``guidance_scale`` is the value a guidance-distilled transformer (``guidance_embeds=True``) would embed; the
  released transformers have no guidance embedding and ignore it, as the pipeline does;
* schedule: linspace(1, 1/N, N) through the scheduler with mu from the image token count (the released config:
  exponential shift, mu from 0.5 at 256 tokens to 0.9 at 8192, ``shift_terminal`` 0.02), and a final 0;
* image sides are multiples of 2 * vae factor (16).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from .autoencoder import LatentCodec, encoder_output, execution_placement
from .base import check_num_steps, repeat_for_batch, sigma_batch
from .flux import PackedLatents, pack_latents, unpack_latents
from .mechanics import classifier_free, rescale_to_norm, scheduler_sigmas, token_shift
from .pipeline import PipelineFlowModel, prompt_list

__all__ = ["QwenImageCondition", "QwenImageLatentCodec", "QwenImageModel"]


class QwenImageLatentCodec(LatentCodec):
    """Encode images to Qwen-Image latents and back, one video frame at a time, with per-channel statistics::

        z = (E(x) - mean_c) / std_c          x = D(z std_c + mean_c)

    with ``latents_mean`` / ``latents_std`` from the VAE config, as the Qwen-Image pipelines normalise (img2img's
    ``_encode_vae_image`` and the text-to-image decode). Images are (B, 3, H, W); the VAE sees (B, 3, 1, H, W).

    Args:
        autoencoder: an ``AutoencoderKLQwenImage``.
        decoder, encoder: optional replacements for decoding / encoding, with the same latent channels, factor and
            interface (e.g. another Qwen-Image VAE); each is applied with its own config's statistics.
    """

    def __init__(self, autoencoder, decoder=None, encoder=None):
        super().__init__(autoencoder, decoder, encoder)
        for module in self.modules():
            if getattr(module.config, "latents_mean", None) is None or not hasattr(module.config, "z_dim"):
                raise ValueError(f"{type(module).__name__} is not a Qwen-Image video VAE (no latents_mean / "
                                 f"latents_std); use AutoencoderKLQwenImage")

    @staticmethod
    def statistics(module, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_c, 1 / std_c) of a VAE's config as float32 (1, C, 1, 1) tensors."""
        config = module.config
        mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return mean, inv_std

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) - mean_c) / std_c; a posterior sample drawn with ``generator``, or its mean when it is None."""
        self.check_image(image)
        module = self.encoder
        device, dtype = execution_placement(module)
        frames = image.unsqueeze(2).to(device=device, dtype=dtype)
        latent = encoder_output(module.encode(frames), generator)[:, :, 0].float()
        mean, inv_std = self.statistics(module, latent.device)
        return (latent - mean) * inv_std

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """x = D(z std_c + mean_c), float32, in [-1, 1] (the VAE clamps)."""
        self.check_latent(latent)
        module = self.decoder
        mean, inv_std = self.statistics(module, latent.device)
        z = latent.float() / inv_std + mean
        device, dtype = execution_placement(module)
        frames = module.decode(z.unsqueeze(2).to(device=device, dtype=dtype)).sample
        return frames[:, :, 0].float()


@dataclass(frozen=True)
class QwenImageCondition:
    """Text conditioning for :class:`QwenImageModel`: embeddings of n prompts with their masks (None: no padding),
    and of their negatives when true CFG is active."""

    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor | None
    guidance_scale: float | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds_mask: torch.Tensor | None = None
    true_cfg_scale: float = 4.0

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def do_true_cfg(self) -> bool:
        return self.true_cfg_scale > 1 and self.negative_prompt_embeds is not None


def _full_mask(mask: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    """A (n, L) bool text mask (all True where the pipeline passed None)."""
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    return mask.to(device=embeds.device, dtype=torch.bool)


def _pad_text(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (n, L, D) embeddings and their (n, L) mask to ``length`` tokens (padding masked out)."""
    extra = length - embeds.shape[1]
    if extra == 0:
        return embeds, mask
    return (torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


class QwenImageModel(PackedLatents, PipelineFlowModel):
    """Flow-model adapter around a diffusers ``QwenImagePipeline`` (components used as they are).

    Args:
        pipeline: a ``QwenImagePipeline`` (Qwen/Qwen-Image, Qwen/Qwen-Image-2512, or the same components).
        decoder: optional replacement VAE for :meth:`decode` (a Qwen-Image video VAE).
        encoder: optional replacement VAE for :meth:`encode` (a Qwen-Image video VAE).
    """

    pipeline_class = "QwenImagePipeline"
    condition_type = QwenImageCondition
    latent_multiple = 2

    repeated_blocks = ("transformer_blocks",)
    codec_class = QwenImageLatentCodec

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        config = pipeline.transformer.config
        self.patch_size = int(config.patch_size)
        self.size_multiple = self.patch_size * self.spatial_factor
        side = int(getattr(pipeline, "default_sample_size", 128)) * self.spatial_factor  # 1024 px for Qwen-Image
        self.default_size = (side, side)
        packed = self.patch_size**2 * self.codec.latent_channels
        out_channels = int(config.out_channels or config.in_channels)
        if packed != int(config.in_channels) or out_channels != self.codec.latent_channels:
            raise ValueError(
                f"the VAE has {self.codec.latent_channels} latent channels, packed {self.patch_size}x{self.patch_size} "
                f"into {packed}, but the transformer takes {config.in_channels} and gives {out_channels}; the "
                "components do not belong together"
            )
        if self.has_guidance_embedding and "guidance" not in inspect.signature(
                pipeline.transformer.time_text_embed.forward).parameters:
            raise ValueError(
                "this QwenImageTransformer2DModel has guidance_embeds=True but its timestep embedding takes no "
                "guidance value in the installed diffusers, so it cannot run; use a transformer with "
                "guidance_embeds=False (every released Qwen-Image checkpoint)"
            )

    @property
    def has_guidance_embedding(self) -> bool:
        """True for a guidance-distilled transformer (none is released), False for Qwen-Image."""
        return bool(self.transformer.config.guidance_embeds)

    # -- geometry and schedule --------------------------------------------------------------------------
    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """linspace(1, 1/N, N) through the scheduler with mu = token_shift(tokens) (the released config shifts
        exponentially and stretches the end to ``shift_terminal``), then a final 0. N = 1 is refused with a
        terminal stretch, which is undefined for one step."""
        check_num_steps(num_steps)
        if num_steps == 1 and self.scheduler.config.get("shift_terminal"):
            raise ValueError(f"the scheduler's shift_terminal={self.scheduler.config.shift_terminal} stretch is 0/0 "
                             f"for one step (the pipeline's sigmas are NaN); use num_steps >= 2")
        height = height or self.default_size[0]
        width = width or self.default_size[1]
        _, h, w = self.latent_shape(height, width)
        tokens = (h // self.patch_size) * (w // self.patch_size)
        return scheduler_sigmas(self.scheduler, num_steps, mu=token_shift(self.scheduler.config, tokens))

    # -- text -------------------------------------------------------------------------------------------
    def _check_text(self, embeds, mask, name: str) -> None:
        """Embeddings (n, L, joint_attention_dim) with an optional (n, L) mask."""
        width = self.transformer.config.joint_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must have shape (batch, tokens, {width}), got {shape}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2])):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name}_mask must have shape {tuple(embeds.shape[:2])} (batch, tokens) like {name}, "
                             f"got {shape}")

    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        *,
        true_cfg_scale: float = 4.0,
        max_sequence_length: int = 512,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
    ) -> QwenImageCondition:
        """Encode prompts once (cached) for :meth:`velocity`.

        ``true_cfg_scale`` t (default 4, the pipeline's) with a negative prompt turns on true classifier-free
        guidance with the per-token norm rescaling (one transformer call on a doubled batch per step); without a
        negative prompt, or with t <= 1, the prompt alone is used, as in the pipeline (an empty negative prompt
        ``""`` or ``" "`` turns CFG on). ``guidance_scale`` is only embedded by a guidance-distilled transformer and
        ignored otherwise. Precomputed ``prompt_embeds`` (n, L, joint_attention_dim) with an optional
        ``prompt_embeds_mask`` (n, L) (1 = token, 0 = padding) may replace the prompt.
        """
        g = None if guidance_scale is None else float(guidance_scale)
        if g is not None and not g >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        t = float(true_cfg_scale)
        if not t >= 0:
            raise ValueError(f"true_cfg_scale must be >= 0 (1 or less disables true CFG), got {true_cfg_scale}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be an integer in [1, 1024] (Qwen-Image's limit), "
                             f"got {max_sequence_length!r}")
        g_used = g if self.has_guidance_embedding else None
        if g is not None and not self.has_guidance_embedding:
            warnings.warn(f"guidance_scale={g:g} is ignored: this Qwen-Image transformer has no guidance embedding; "
                          f"classifier-free guidance is true_cfg_scale with a negative prompt "
                          f"(e.g. condition(prompt, ' ', true_cfg_scale={g:g}))", stacklevel=2)
        if self.has_guidance_embedding and g_used is None:
            raise ValueError("this transformer is guidance-distilled: pass guidance_scale (e.g. 3.5)")
        want_negative = t > 1 and (negative_prompt is not None or negative_prompt_embeds is not None)
        if prompt_embeds is not None or prompt_embeds_mask is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            if prompt_embeds is None:
                raise ValueError("prompt_embeds_mask needs prompt_embeds")
            return self._condition_from_embeds(prompt_embeds, prompt_embeds_mask, negative_prompt,
                                               negative_prompt_embeds, negative_prompt_embeds_mask, g_used, t,
                                               want_negative, max_sequence_length)
        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        negatives = prompt_list(negative_prompt, len(prompts), "negative_prompt") if want_negative else None
        key = (tuple(prompts), None if negatives is None else tuple(negatives), g_used, t, max_sequence_length)
        return self.cached_condition(key, lambda: self._encode_condition(prompts, negatives, g_used, t,
                                                                         max_sequence_length))

    def _encode(self, prompts=None, embeds=None, mask=None, max_sequence_length: int = 512):
        return self.pipeline.encode_prompt(prompt=prompts, device=self.device, prompt_embeds=embeds,
                                           prompt_embeds_mask=mask, max_sequence_length=max_sequence_length)

    def _encode_condition(self, prompts, negatives, g_used, t, max_sequence_length) -> QwenImageCondition:
        pos, mask = self._encode(prompts, max_sequence_length=max_sequence_length)
        neg = neg_mask = None
        if negatives is not None:
            neg, neg_mask = self._encode(negatives, max_sequence_length=max_sequence_length)
        return QwenImageCondition(pos, mask, g_used, neg, neg_mask, t)

    def _condition_from_embeds(self, embeds, mask, negative_prompt, negative_embeds, negative_mask, g_used, t,
                               want_negative, max_sequence_length) -> QwenImageCondition:
        self._check_text(embeds, mask, "prompt_embeds")
        pos, pos_mask = self._encode(embeds=embeds, mask=mask, max_sequence_length=max_sequence_length)
        neg = neg_mask = None
        if want_negative:
            n = pos.shape[0]
            if negative_embeds is None:
                if negative_mask is not None:
                    raise ValueError("negative_prompt_embeds_mask needs negative_prompt_embeds")
                neg_cond = self.condition(negative_prompt, None, g_used, true_cfg_scale=1.0,
                                          max_sequence_length=max_sequence_length)
                neg, neg_mask = neg_cond.prompt_embeds, neg_cond.prompt_embeds_mask
                neg = repeat_for_batch(neg, n, "prompt")
                neg_mask = None if neg_mask is None else repeat_for_batch(neg_mask, n, "prompt")
            else:
                if negative_prompt is not None:
                    raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
                self._check_text(negative_embeds, negative_mask, "negative_prompt_embeds")
                if negative_embeds.shape[0] != n:
                    raise ValueError(f"negative_prompt_embeds has batch {negative_embeds.shape[0]} but prompt_embeds "
                                     f"has {n}; give one negative per prompt")
                neg, neg_mask = self._encode(embeds=negative_embeds, mask=negative_mask,
                                             max_sequence_length=max_sequence_length)
        return QwenImageCondition(pos, pos_mask, g_used, neg, neg_mask, t)

    # -- velocity ---------------------------------------------------------------------------------------
    def _text_batch(self, cond: QwenImageCondition, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings and mask for ``batch`` latents: the prompts, then (true CFG) their negatives, padded
        to a common length, on the model's device (the embeddings in its dtype); the mask is None when no token is
        padding. Made once per condition and batch (:meth:`text_batch`), the mask's test read there."""
        parts = [(cond.prompt_embeds, cond.prompt_embeds_mask)]
        if cond.do_true_cfg:
            parts.append((cond.negative_prompt_embeds, cond.negative_prompt_embeds_mask))
        length = max(e.shape[1] for e, _ in parts)
        embeds, masks = [], []
        for e, m in parts:
            e = repeat_for_batch(e, batch)
            e, m = _pad_text(e, _full_mask(None if m is None else repeat_for_batch(m, batch), e), length)
            embeds.append(e)
            masks.append(m)
        embeds, mask = torch.cat(embeds), torch.cat(masks)
        return embeds.to(device=self.device, dtype=self.dtype), (None if bool(mask.all()) else mask.to(self.device))

    def velocity(self, x: torch.Tensor, sigma, cond: QwenImageCondition | None = None,
                 grad: bool = False) -> torch.Tensor:
        """v_theta(x, s, c) on unpacked latents (B, C, h, w); float32."""
        cond = self.velocity_inputs(x, cond)
        batch, _, h, w = x.shape
        device, dtype = self.device, self.dtype
        copies = 2 if cond.do_true_cfg else 1
        embeds, mask = self.text_batch(cond, batch, lambda: self._text_batch(cond, batch))
        tokens = pack_latents(x.to(device=device, dtype=dtype)).repeat(copies, 1, 1)
        timestep = sigma_batch(sigma, batch, device).repeat(copies)
        guidance = None
        if cond.guidance_scale is not None:
            guidance = torch.full((batch * copies,), cond.guidance_scale, device=device, dtype=torch.float32)
        with torch.set_grad_enabled(grad):
            v = self.transformer(
                hidden_states=tokens,
                timestep=timestep,
                guidance=guidance,
                encoder_hidden_states=embeds.to(device=device, dtype=dtype),
                encoder_hidden_states_mask=None if mask is None else mask.to(device),
                img_shapes=[[(1, h // 2, w // 2)]] * (batch * copies),
                return_dict=False,
            )[0].float()
            if cond.do_true_cfg:  # norms over each packed token's channels, as in the pipeline
                v_pos, v_neg = v.chunk(2)
                v = rescale_to_norm(classifier_free(v_pos, v_neg, cond.true_cfg_scale), v_pos)
            v = unpack_latents(v, h, w)
        return v.to(x.device)

    # -- autoencoder ------------------------------------------------------------------------------------
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) - mean_c) / std_c on one video frame; a posterior sample with ``generator``, the mean
        without."""
        return super().encode(image, generator)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """x = D(z std_c + mean_c) in [-1, 1], float32."""
        return super().decode(latent)
