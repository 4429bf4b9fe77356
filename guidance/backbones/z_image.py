"""Z-Image / Z-Image-Turbo (Tongyi-MAI) as a flow model: a single-stream DiT over FLUX.1-style VAE latents.

Z-Image Team, "Z-Image: An Efficient Image Generation Foundation Model with Single-Stream Diffusion Transformer"
(2025), https://github.com/Tongyi-MAI/Z-Image; diffusers ``pipelines/z_image/pipeline_z_image.py``.

Backbone conventions handled here and nowhere else:

* latents are seen by every caller as (B, 16, H/8, W/8), the layout in which the pipeline draws its noise; the
  transformer takes them as a list of per-sample (C, 1, h, w) tensors (one frame), patchifies 2x2 inside and
  returns a list of the same shapes;
* time runs the other way: the transformer takes t = (1000 - 1000 s) / 1000 (0 = noise, 1 = data, times
  ``t_scale`` inside) and predicts x0 - eps, the negated velocity; here v = -output, so that
  v = eps - x0 as everywhere in flowsteer;
* text: Qwen3's second-to-last hidden states of the chat-templated prompt, cut to the attention mask, so each
  prompt has its own token count; the transformer takes the list of (L_i, D) features without padding;
* classifier-free guidance, active iff w = ``guidance_scale`` > 0 (Z-Image-Turbo runs with w = 0):
  v = v_c + w (v_c - v_u), i.e. the usual rule with scale 1 + w; one batched call on [positive, negative] as the
  pipeline makes it. ``cfg_normalization`` c > 0 caps the norm of each sample's whole guided velocity at
  c |v_c|; ``cfg_truncation`` tau <= 1 switches guidance off wherever t_norm = (1000 - 1000 s) / 1000 > tau,
  a function of s, so velocity(x, s, c) applies it at any s;
* schedule: ``linspace(1, 1/N, N)`` (float32, the pipeline's ``get_default_z_image_sigmas``) through the scheduler,
  mu from the image token count (used when the scheduler shifts dynamically; Z-Image-Turbo's shifts statically
  by 3), and a final 0. Older diffusers releases set ``scheduler.sigma_min = 0.0`` and let the scheduler space
  N timesteps from 1 to 0 (a redundant last step from 0 to 0); that rule is followed when the pipeline module
  has no ``get_default_z_image_sigmas``;
* latents z = (E(x) - shift) * scale with the VAE config's factors (FLUX.1's 0.3611, 0.1159); image sides are
  multiples of 2 * vae factor (16) and at most the rotary tables' length in patches (8192 px released).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .base import check_num_steps, sigma_batch
from .mechanics import classifier_free, rescale_to_norm, scheduler_sigmas, token_shift
from .pipeline import PipelineFlowModel, prompt_list

__all__ = ["ZImageCondition", "ZImageModel", "repeat_list", "rope_max_size"]


def rope_max_size(axes_lens, patch_size: int, spatial_factor: int) -> int:
    """The largest image side whose patch rows and columns stay inside the rotary tables of lengths ``axes_lens``
    (axis 0: caption / frame, axes 1 and 2: rows and columns, counted from 0), in pixels."""
    return int(min(axes_lens[1], axes_lens[2])) * patch_size * spatial_factor


def repeat_list(items, batch: int, what: str = "condition") -> list:
    """Each of the n entries of ``items`` batch / n times in a row (the pipelines' num_images_per_prompt order)."""
    n = len(items)
    if batch % n:
        raise ValueError(f"a batch of {batch} latents does not fit a {what} of batch {n}; use a multiple of {n}")
    return [item for item in items for _ in range(batch // n)]


@dataclass(frozen=True)
class ZImageCondition:
    """Text conditioning for :class:`ZImageModel`: per-prompt caption features (L_i, D) of n prompts, and of their
    negatives when guidance is active (w > 0)."""

    prompt_embeds: tuple[torch.Tensor, ...]
    guidance_scale: float
    negative_prompt_embeds: tuple[torch.Tensor, ...] | None = None
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0

    @property
    def batch_size(self) -> int:
        return len(self.prompt_embeds)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 0 and self.negative_prompt_embeds is not None


class ZImageModel(PipelineFlowModel):
    """Flow-model adapter around a diffusers ``ZImagePipeline`` (components used as they are).

    Args:
        pipeline: a ``ZImagePipeline`` (Z-Image or Z-Image-Turbo checkpoint).
        decoder: optional cheaper autoencoder for :meth:`decode` (e.g. TAEF1: the VAE is FLUX.1's).
        encoder: optional cheaper autoencoder for :meth:`encode` (e.g. TAEF1).
    """

    pipeline_class = "ZImagePipeline"
    condition_type = ZImageCondition

    #: Z-Image's transformer holds its repeated blocks here (refiners and main layers).
    repeated_blocks = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        config = pipeline.transformer.config
        self.patch_size = 2  # what the pipeline runs (the transformer's forward default)
        self.latent_multiple = self.patch_size
        if self.patch_size not in tuple(config.all_patch_size):
            raise ValueError(f"the transformer has patch sizes {tuple(config.all_patch_size)} but the pipeline uses 2; "
                             "the components do not belong together")
        self.size_multiple = self.patch_size * self.spatial_factor
        self.default_size = (1024, 1024)  # the pipeline's default height and width
        self.max_size = rope_max_size(config.axes_lens, self.patch_size, self.spatial_factor)
        self.check_latent_channels(config.in_channels)

    # -- geometry and schedule --------------------------------------------------------------------------
    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """float32 linspace(1, 1/N, N) through the scheduler with mu = the shift line at the image token count,
        then a final 0 (the rule of older diffusers releases where the pipeline module predates it)."""
        from diffusers.pipelines.z_image import pipeline_z_image

        check_num_steps(num_steps)
        height = height or self.default_size[0]
        width = width or self.default_size[1]
        _, h, w = self.latent_shape(height, width)
        mu = token_shift(self.scheduler.config, (h // self.patch_size) * (w // self.patch_size))
        default_sigmas = getattr(pipeline_z_image, "get_default_z_image_sigmas", None)
        if default_sigmas is None:
            scheduler = copy.deepcopy(self.scheduler)
            scheduler.sigma_min = 0.0
            return scheduler_sigmas(scheduler, num_steps, mu, linspace=False)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(sigmas=default_sigmas(num_steps), device="cpu", mu=mu)
        return scheduler.sigmas.to(torch.float32)

    # -- text -------------------------------------------------------------------------------------------
    def _check_features(self, embeds, name: str) -> tuple[torch.Tensor, ...]:
        """Caption features: a list of (tokens, cap_feat_dim) tensors, one per prompt, or a (n, tokens, D) tensor."""
        width = int(self.transformer.config.cap_feat_dim)
        items = list(embeds) if isinstance(embeds, (list, tuple)) or (
            isinstance(embeds, torch.Tensor) and embeds.ndim == 3) else None
        if not items or not all(isinstance(e, torch.Tensor) and e.ndim == 2 and e.shape[0] > 0
                                and e.shape[1] == width for e in items):
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else [
                tuple(getattr(e, "shape", ())) for e in embeds] if isinstance(embeds, (list, tuple)) else embeds
            raise ValueError(f"{name} must be a list of (tokens, {width}) tensors, one per prompt, got {got}")
        return tuple(items)

    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = 5.0,
        *,
        cfg_normalization: bool | float = False,
        cfg_truncation: float = 1.0,
        max_sequence_length: int = 512,
        prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
    ) -> ZImageCondition:
        """Encode prompts once (cached) for :meth:`velocity`.

        ``guidance_scale`` w > 0 turns on classifier-free guidance against ``negative_prompt`` (default: the empty
        prompt), v = v_c + w (v_c - v_u); 0 switches it off (Z-Image-Turbo's setting). ``cfg_normalization`` c
        (True = 1) caps each sample's guided norm at c |v_c|; ``cfg_truncation`` tau <= 1 drops guidance where
        (1000 - 1000 s) / 1000 > tau. Precomputed ``prompt_embeds`` (a list of (tokens, cap_feat_dim) tensors)
        may replace the prompt, with ``negative_prompt_embeds`` or a ``negative_prompt`` for the guidance.
        """
        g = 5.0 if guidance_scale is None else float(guidance_scale)
        if not g >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (0 disables classifier-free guidance), got {guidance_scale}")
        norm = float(cfg_normalization)
        if not norm >= 0:
            raise ValueError(f"cfg_normalization must be >= 0 (True = 1; 0 or False disables it), "
                             f"got {cfg_normalization}")
        trunc = float(cfg_truncation)
        if trunc != trunc:
            raise ValueError("cfg_truncation must be a number (values above 1 disable truncation), got nan")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
        do_cfg = g > 0
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            pos = self._check_features(prompt_embeds, "prompt_embeds")
            neg = None
            if do_cfg:
                if negative_prompt_embeds is None:
                    texts = prompt_list("" if negative_prompt is None else negative_prompt, len(pos), "negative_prompt")
                    plain = self.condition(texts, guidance_scale=0.0, max_sequence_length=max_sequence_length)
                    neg = plain.prompt_embeds
                else:
                    neg = self._check_features(negative_prompt_embeds, "negative_prompt_embeds")
                if len(neg) != len(pos):
                    raise ValueError(f"negative_prompt_embeds has {len(neg)} entries but prompt_embeds has "
                                     f"{len(pos)}; give one per prompt")
            return ZImageCondition(pos, g, neg, norm, trunc)

        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        negatives = prompt_list("" if negative_prompt is None else negative_prompt, len(prompts),
                                "negative_prompt") if do_cfg else None
        key = (tuple(prompts), None if negatives is None else tuple(negatives), g, norm, trunc, max_sequence_length)
        return self.cached_condition(key, lambda: self._encode_condition(prompts, negatives, g, norm, trunc,
                                                                         max_sequence_length))

    def _encode_condition(self, prompts, negatives, g, norm, trunc, max_sequence_length) -> ZImageCondition:
        # encode_prompt rewrites the lists it gets in place (chat template): give it copies
        pos, neg = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=negatives is not None,
            negative_prompt=None if negatives is None else list(negatives), max_sequence_length=max_sequence_length,
        )
        return ZImageCondition(tuple(pos), g, None if negatives is None else tuple(neg), norm, trunc)

    # -- velocity ---------------------------------------------------------------------------------------
    def _call(self, x: torch.Tensor, timestep: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """The transformer on (B, C, h, w) latents as a list of one-frame samples; its output, float32, (B, C, h, w)."""
        dtype, device = self.dtype, self.device
        samples = list(x.to(device=device, dtype=dtype).unsqueeze(2).unbind(0))
        features = [f.to(device=device, dtype=dtype) for f in features]
        out = self.transformer(samples, timestep, features, return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    def velocity(self, x: torch.Tensor, sigma, cond: ZImageCondition | None = None, grad: bool = False
                 ) -> torch.Tensor:
        """v_theta(x, s, c) = -transformer(x, (1000 - 1000 s) / 1000, c) on latents (B, C, h, w); float32."""
        cond = self.velocity_inputs(x, cond)
        batch = x.shape[0]
        device = self.device
        steps = float(self.scheduler.config.num_train_timesteps)
        timestep = (steps - sigma_batch(sigma, batch, device) * steps) / steps  # the pipeline's arithmetic
        # per sample where CFG is truncated, tau < 1 (one host read per step); tau >= 1 keeps it at every step (the
        # pipeline's t_norm <= 1 for every s >= 0), with no test to read
        truncated = cond.do_cfg and cond.cfg_truncation < 1
        guided = timestep.double() <= cond.cfg_truncation if truncated else None
        features = repeat_list(cond.prompt_embeds, batch, "prompt")
        with torch.set_grad_enabled(grad):
            if not cond.do_cfg or (guided is not None and not bool(guided.any())):
                v = -self._call(x, timestep, features)
            else:  # one batched call on [positive, negative]
                negatives = repeat_list(cond.negative_prompt_embeds, batch, "prompt")
                out = self._call(torch.cat([x, x]), torch.cat([timestep, timestep]), features + negatives)
                v_pos, v_neg = (-out).chunk(2)
                v = classifier_free(v_pos, v_neg, 1.0 + cond.guidance_scale)
                if cond.cfg_normalization > 0:
                    v = rescale_to_norm(v, v_pos, dim=(1, 2, 3), max_ratio=cond.cfg_normalization)
                if guided is not None:
                    v = torch.where(guided[:, None, None, None], v, v_pos)
        return v.to(x.device)
