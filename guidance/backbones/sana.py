"""SANA (linear-attention DiT over DC-AE latents, Gemma-2 text encoder) as a flow model.

Xie et al., 2025, "SANA: Efficient High-Resolution Image Synthesis with Linear Diffusion Transformers"
(https://github.com/NVlabs/Sana; diffusers ``pipelines/sana/pipeline_sana.py``).

Backbone conventions handled here and nowhere else:

* the transformer predicts the flow velocity v = eps - x0 (``prediction_type="flow_prediction"``), flowsteer's
  own convention, and takes ``timestep = 1000 * s`` (the scheduler's ``num_train_timesteps``) times the config's
  ``timestep_scale``; no packing: latents (B, C, H/32, W/32) go in as they are (patch size 1), and a transformer
  with twice the latent channels out (learned sigma) has its second half dropped, as the pipeline does;
* text: Gemma-2 hidden states of the prompt prefixed with the "complex human instruction" (the pipeline's default
  list, read from ``SanaPipeline.__call__``; ``complex_human_instruction=None`` turns it off). Of the
  ``instruction tokens + max_sequence_length - 2`` tokens the pipeline keeps the first (``<bos>``) and the last
  ``max_sequence_length - 1`` (paper, Sec. 3.1), with their attention mask, which the transformer's cross-attention
  uses. Negative prompts are encoded without the instruction. Both come from the pipeline's own ``encode_prompt``;
* classifier-free guidance is one batched call on [negative, positive], as in the pipeline:
  v = v_u + w (v_c - v_u), active iff w > 1. An omitted negative prompt is "" (the pipeline's default). With no
  text at all, :meth:`SanaModel.condition` gives the unconditional branch: "" encoded without the instruction, and
  no CFG;
* latents z = E(x) * scaling_factor with DC-AE (``AutoencoderDC``: deterministic, its ``encode`` returns
  ``.latent``, no shift), x = D(z / scaling_factor), by the shared latent codec. Image sides are multiples of
  ``32 * patch size`` (32);
* schedule: the pipeline's scheduler's own ``set_timesteps`` (the released checkpoints: DPM-Solver++ with
  ``use_flow_sigmas`` and ``flow_shift`` 3, or 6 at 4096 px). flowsteer takes Euler steps on those sigmas; with
  ``FlowMatchEulerDiscreteScheduler`` (same shift) that is the pipeline's own update and the results agree, while
  with the DPM-Solver scheduler the noise levels are the pipeline's but its second-order multistep update (and its
  integer timesteps ``int(1000 s)``) are not reproduced;
* resolution binning (``use_resolution_binning``, on by default in the pipeline, which renders at the nearest
  aspect-ratio bin and resizes the image) is not done: flowsteer renders at the size given, which is the
  pipeline with ``use_resolution_binning=False``;
* diffusers repeats the attention masks of several prompts with ``num_images_per_prompt`` > 1 in the order
  [m0, m1, m0, m1] against embeddings [e0, e0, e1, e1]; here every mask stays with its prompt (the two agree
  whenever the prompts' masks are equal).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .base import check_num_steps, repeat_for_batch, sigma_batch
from .mechanics import classifier_free, scheduler_sigmas
from .pipeline import PipelineFlowModel, prompt_list

__all__ = ["SanaCondition", "SanaModel", "default_instruction"]


def default_instruction(pipeline_class) -> tuple[str, ...]:
    """The pipeline's default ``complex_human_instruction`` (read from its ``__call__`` signature)."""
    return tuple(inspect.signature(pipeline_class.__call__).parameters["complex_human_instruction"].default)


@dataclass(frozen=True)
class SanaCondition:
    """Text conditioning for :class:`SanaModel`: Gemma embeddings of n prompts with their attention masks (and of
    the negatives when w > 1)."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_prompt_attention_mask: torch.Tensor | None
    guidance_scale: float

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1


class SanaModel(PipelineFlowModel):
    """Flow-model adapter around a diffusers ``SanaPipeline`` (components used as they are: dtype, device,
    offloading and quantization stay the user's).

    Args:
        pipeline: a ``SanaPipeline`` (SANA 0.6B / 1.6B / 4.8B, SANA 1.5).
        decoder: optional cheaper autoencoder for :meth:`decode` with DC-AE's latents.
        encoder: optional cheaper autoencoder for :meth:`encode` with DC-AE's latents.
    """

    pipeline_class = "SanaPipeline"
    cfg_in_batch = True
    condition_type = SanaCondition

    #: SANA's transformer holds its repeated blocks here (for :meth:`compile`).
    repeated_blocks = ("transformer_blocks",)
    default_guidance_scale = 4.5

    def __init__(self, pipeline, decoder=None, encoder=None):
        super().__init__(pipeline, decoder, encoder)
        config = pipeline.transformer.config
        self.patch_size = self.latent_multiple = int(config.patch_size)
        self.size_multiple = self.spatial_factor * self.patch_size
        side = int(config.sample_size) * self.spatial_factor  # the pipeline's 1024 px for sample_size 32
        self.default_size = (side, side)
        self.instruction = default_instruction(type(pipeline))
        self.check_latent_channels(config.in_channels)

    # -- geometry and schedule --------------------------------------------------------------------------
    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The pipeline's schedule: its scheduler's ``set_timesteps(num_steps)`` on a copy (DPM-Solver flow sigmas
        or the Euler scheduler's, both with the static flow shift; no image-size dependence), a final 0 included."""
        check_num_steps(num_steps)
        if height is not None or width is not None:
            self.check_size(height or self.default_size[0], width or self.default_size[1])
        return scheduler_sigmas(self.scheduler, num_steps, linspace=False)

    # -- text -------------------------------------------------------------------------------------------
    def _instruction(self, complex_human_instruction) -> tuple[str, ...] | None:
        if complex_human_instruction is None or complex_human_instruction is False:
            return None
        if isinstance(complex_human_instruction, str):
            raise ValueError("complex_human_instruction must be a list of strings (joined with newlines), not a string")
        return tuple(complex_human_instruction) or None

    def _check_text_embeds(self, embeds, mask, name: str, mask_name: str) -> torch.Tensor:
        """Precomputed Gemma embeddings must be (n, tokens, caption_channels); their mask (n, tokens), ones when
        not given. Returns the mask."""
        width = int(self.transformer.config.caption_channels)
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must have shape (batch, tokens, {width}), got {shape}")
        if mask is None:
            return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{mask_name} must have shape {tuple(embeds.shape[:2])} (one 0/1 per token of "
                             f"{name}), got {shape}")
        return mask

    def _text_settings(self, complex_human_instruction, max_sequence_length) -> tuple[str, ...] | None:
        """The instruction prefix in use (True: the pipeline's own), after checking the token budget."""
        if not isinstance(max_sequence_length, int) or max_sequence_length < 2:
            raise ValueError(f"max_sequence_length must be an integer >= 2, got {max_sequence_length!r}")
        return self._instruction(self.instruction if complex_human_instruction is True else complex_human_instruction)

    def _given_embeds(self, prompt, prompt_embeds, prompt_attention_mask) -> torch.Tensor | None:
        """The checked mask of precomputed ``prompt_embeds`` (all ones when none is given); None without them."""
        if prompt_embeds is None and prompt_attention_mask is None:
            return None
        if prompt is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt_embeds is None:
            raise ValueError("prompt_attention_mask needs prompt_embeds; pass both")
        return self._check_text_embeds(prompt_embeds, prompt_attention_mask, "prompt_embeds", "prompt_attention_mask")

    @torch.no_grad()
    def condition(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = 4.5,
        *,
        complex_human_instruction: list[str] | None | bool = True,
        max_sequence_length: int = 300,
        clean_caption: bool = False,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> SanaCondition:
        """Encode prompts once (cached per prompts and settings) for :meth:`velocity`.

        ``guidance_scale`` w is the CFG weight (default 4.5, the pipeline's); w <= 1 disables CFG.
        ``complex_human_instruction``: True (the pipeline's default list), a list of strings, or None / [] for
        none. Precomputed ``prompt_embeds`` (n, L, caption_channels) with an optional ``prompt_attention_mask``
        (n, L) may replace the prompt. An omitted negative prompt is "", as in the pipeline; with no text at all the
        condition is the unconditional branch ("" without the instruction) and CFG is off.
        """
        w = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not w >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 or less disables guidance), got {guidance_scale}")
        instruction = self._text_settings(complex_human_instruction, max_sequence_length)
        mask = self._given_embeds(prompt, prompt_embeds, prompt_attention_mask)
        if mask is not None:
            neg = neg_mask = None
            if w > 1:
                if negative_prompt_embeds is None:
                    n = prompt_embeds.shape[0]
                    texts = prompt_list("" if negative_prompt is None else negative_prompt, None, "negative_prompt")
                    unc = self.condition(texts, guidance_scale=1.0, complex_human_instruction=None,
                                         max_sequence_length=prompt_embeds.shape[1], clean_caption=clean_caption)
                    neg = repeat_for_batch(unc.prompt_embeds, n, "prompt")
                    neg_mask = repeat_for_batch(unc.prompt_attention_mask, n, "prompt")
                else:
                    neg = negative_prompt_embeds
                    neg_mask = self._check_text_embeds(neg, negative_prompt_attention_mask, "negative_prompt_embeds",
                                                       "negative_prompt_attention_mask")
                if neg.shape != prompt_embeds.shape:
                    raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} must have the shape of "
                                     f"prompt_embeds {tuple(prompt_embeds.shape)}")
            return SanaCondition(prompt_embeds, mask, neg, neg_mask, w)

        if prompt is None and negative_prompt is None:
            instruction, w = None, min(w, 1.0)  # no text: the unconditional branch alone
        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        negatives = prompt_list("" if negative_prompt is None else negative_prompt, len(prompts), "negative_prompt")
        key = (tuple(prompts), tuple(negatives) if w > 1 else None, w, instruction, max_sequence_length, clean_caption)
        return self.cached_condition(
            key, lambda: self._encode_condition(prompts, negatives, w, instruction, max_sequence_length, clean_caption)
        )

    def _encode_condition(self, prompts, negatives, w, instruction, max_sequence_length, clean_caption):
        pos, mask, neg, neg_mask = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=w > 1,
            negative_prompt=negatives,
            num_images_per_prompt=1,
            device=self.device,
            clean_caption=clean_caption,
            max_sequence_length=max_sequence_length,
            complex_human_instruction=None if instruction is None else list(instruction),
        )
        return SanaCondition(pos, mask, neg if w > 1 else None, neg_mask if w > 1 else None, w)

    # -- velocity ---------------------------------------------------------------------------------------
    def _transformer(self, hidden, timestep, embeds, mask, guidance=None) -> torch.Tensor:
        """One transformer call on latents (B, C, h, w); float32 output with a learned-sigma half dropped."""
        device, dtype = self.device, self.dtype
        out = self.transformer(
            hidden.to(device=device, dtype=dtype),
            encoder_hidden_states=embeds.to(device=device, dtype=dtype),
            encoder_attention_mask=mask.to(device),
            timestep=timestep,
            guidance=guidance,
            return_dict=False,
        )[0].float()
        channels = int(self.transformer.config.in_channels)
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        return out

    def _text_inputs(self, cond: SanaCondition, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, attention mask) for ``batch`` latents on the model's device, the embeddings in its dtype:
        [negative; positive] under CFG (made once per condition and batch, :meth:`text_batch`)."""
        embeds = repeat_for_batch(cond.prompt_embeds, batch)
        mask = repeat_for_batch(cond.prompt_attention_mask, batch)
        if cond.do_cfg:
            embeds = torch.cat([repeat_for_batch(cond.negative_prompt_embeds, batch).to(embeds.device), embeds])
            mask = torch.cat([repeat_for_batch(cond.negative_prompt_attention_mask, batch).to(mask.device), mask])
        return embeds.to(device=self.device, dtype=self.dtype), mask.to(self.device)

    def velocity(self, x: torch.Tensor, sigma, cond: SanaCondition | None = None, grad: bool = False) -> torch.Tensor:
        """v = v_u + w (v_c - v_u) (one batched transformer call) or v_c when w <= 1; float32 like ``x``."""
        cond = self.velocity_inputs(x, cond)
        batch = x.shape[0]
        device = self.device
        config = self.transformer.config
        scale = float(self.scheduler.config.get("num_train_timesteps", 1000))
        timestep = sigma_batch(sigma, batch, device) * scale * float(getattr(config, "timestep_scale", 1.0))
        embeds, mask = self.text_batch(cond, batch, lambda: self._text_inputs(cond, batch))
        hidden = x
        if cond.do_cfg:  # one batched call on [negative, positive]
            hidden = torch.cat([x, x])
            timestep = torch.cat([timestep, timestep])
        with torch.set_grad_enabled(grad):
            out = self._transformer(hidden, timestep, embeds, mask)
            if cond.do_cfg:
                v_u, v_c = out.chunk(2)
                out = classifier_free(v_c, v_u, cond.guidance_scale)
        return out.to(x.device)
