"""SANA-Sprint (few-step consistency-distilled SANA: TrigFlow / sCM) as a flow model.

Chen et al., 2025, "SANA-Sprint: One-Step Diffusion with Continuous-Time Consistency Distillation"
(https://github.com/NVlabs/Sana; diffusers ``pipelines/sana/pipeline_sana_sprint.py``, ``SCMScheduler``).

The pipeline works in TrigFlow: a state y_theta = sigma_d (cos(theta) x0 + sin(theta) eps) at an angle theta from
pi/2 (noise) to 0 (data), sigma_d = the scheduler's ``sigma_data`` (0.5). Per step it feeds the transformer

    s = sin(theta) / (cos(theta) + sin(theta)),      x_s = y_theta / sigma_d / (cos(theta) + sin(theta))
      = (1 - s) x0 + s eps,

i.e. flowsteer's own state at flowsteer's time s, with ``timestep = s`` (not scaled), turns the output F into a
TrigFlow prediction and takes x0_hat = cos(theta) y_theta - sin(theta) F_trig. Written out with
k = cos(theta) + sin(theta), cos(theta) = (1 - s) k, sin(theta) = s k and k^2 ((1 - s)^2 + s^2) = 1, that is

    x0_hat / sigma_d = x_s - s F,

so F is the rectified-flow velocity v = eps - x0 and flowsteer's x0_hat = x_s - s v is the pipeline's denoised
estimate: the adapter returns the transformer's output as it is.

Backbone conventions handled here and nowhere else (text and latents as in :mod:`guidance.backbones.sana`):

* no classifier-free guidance: the guidance value w (default 4.5) enters a guidance embedding as
  ``w * guidance_embeds_scale`` (0.1), cast to the text embeddings' dtype as the pipeline does; a negative prompt
  has no effect (a warning says so). With no prompt the condition is "" encoded without the instruction;
* schedule: the scheduler's angles (``max_timesteps`` 1.5708 and, for two steps, ``intermediate_timesteps`` 1.3;
  otherwise ``linspace(max_timesteps, 0, N + 1)``) mapped to s as above. The released 1.57080 lies 3.7e-6 above
  pi/2, where s_0 = 1.0000037 > 1: flowsteer's schedule starts at s = 1 exactly (pure noise), and the velocity at
  s = 1 reads the state as the pipeline's first step does (the noise times sqrt(s_0² + (1 - s_0)²) at level
  s_0, v = x - x0_hat), so that x0_hat there is the pipeline's first denoised latent;
* several steps: the SCM scheduler re-noises after each step with fresh noise, x_{s'} = (1 - s') x0_hat + s' n,
  n ~ N(0, I) drawn from the generator (stochastic consistency sampling). flowsteer's sampler takes deterministic
  Euler steps on the same noise levels instead, x_{s'} = x0_hat + (s' / s)(x_s - x0_hat), which reuses the
  predicted noise; :meth:`SanaSprintModel.consistency_sampling` gives the two sampler callbacks that replace each
  Euler step by the SCM re-noising (with the generator of the initial noise: the pipeline's draws exactly);
* resolution binning is not done (flowsteer renders at the size given: ``use_resolution_binning=False``).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .base import check_num_steps, repeat_for_batch, sigma_batch
from .pipeline import prompt_list
from .sana import SanaModel

__all__ = ["SanaSprintCondition", "SanaSprintModel", "trigflow_to_flow"]


def trigflow_to_flow(theta: torch.Tensor) -> torch.Tensor:
    """Flow time s = sin(theta) / (cos(theta) + sin(theta)) of TrigFlow angles (float32, as the pipeline computes)."""
    theta = torch.as_tensor(theta, dtype=torch.float32)
    return torch.sin(theta) / (torch.cos(theta) + torch.sin(theta))


@dataclass(frozen=True)
class SanaSprintCondition:
    """Text conditioning for :class:`SanaSprintModel`: Gemma embeddings of n prompts, their attention masks and the
    distilled guidance value."""

    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    guidance_scale: float

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


class SanaSprintModel(SanaModel):
    """Flow-model adapter around a diffusers ``SanaSprintPipeline`` (text encoder, DC-AE codec and transformer
    calls shared with :class:`~guidance.backbones.sana.SanaModel`).

    Args:
        pipeline: a ``SanaSprintPipeline`` (SANA-Sprint 0.6B / 1.6B).
        decoder: optional cheaper autoencoder for :meth:`decode` with DC-AE's latents.
        encoder: optional cheaper autoencoder for :meth:`encode` with DC-AE's latents.
        max_timesteps: the first TrigFlow angle (default: the pipeline's 1.5708).
        intermediate_timesteps: the middle angle of a two-step schedule (default: the pipeline's 1.3).
    """

    pipeline_class = "SanaSprintPipeline"
    condition_type = SanaSprintCondition

    def __init__(self, pipeline, decoder=None, encoder=None, max_timesteps: float | None = None,
                 intermediate_timesteps: float | None = None):
        super().__init__(pipeline, decoder, encoder)
        if not getattr(pipeline.transformer.config, "guidance_embeds", False):
            raise ValueError("SANA-Sprint's transformer has a guidance embedding (guidance_embeds=True); this one "
                             "has none: use SanaModel for a SANA transformer")
        defaults = _call_defaults(type(pipeline))
        self.max_timesteps = float(defaults["max_timesteps"] if max_timesteps is None else max_timesteps)
        self.intermediate_timesteps = float(defaults["intermediate_timesteps"] if intermediate_timesteps is None
                                            else intermediate_timesteps)
        if not 0 < self.intermediate_timesteps < self.max_timesteps <= math.pi / 2 + 1e-4:
            raise ValueError(f"the TrigFlow angles must satisfy 0 < intermediate_timesteps < max_timesteps <= pi/2, "
                             f"got {self.intermediate_timesteps} and {self.max_timesteps}")

    def start_level(self) -> torch.Tensor:
        """s_0 = sin(theta_0) / (cos(theta_0) + sin(theta_0)) of the first angle ``max_timesteps`` (float32, as the
        pipeline computes it; 1.0000037 for the released 1.57080), the level the pipeline's first step reads."""
        return trigflow_to_flow(torch.tensor(self.max_timesteps, dtype=torch.float32)).to(self.device)

    @property
    def sigma_data(self) -> float:
        return float(self.scheduler.config.get("sigma_data", 0.5))

    # -- schedule ---------------------------------------------------------------------------------------
    def angles(self, num_steps: int) -> torch.Tensor:
        """The pipeline's ``num_steps + 1`` TrigFlow angles: [max, intermediate, 0] for two steps, else
        linspace(max, 0, N + 1) (the scheduler's ``set_timesteps`` on a copy)."""
        check_num_steps(num_steps)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_steps, device="cpu", max_timesteps=self.max_timesteps,
                                intermediate_timesteps=self.intermediate_timesteps if num_steps == 2 else None)
        return scheduler.timesteps.to(torch.float32)

    def sigmas(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """s_i = sin(theta_i) / (cos(theta_i) + sin(theta_i)) of the pipeline's angles, at most 1 (the first
        angle, 3.7e-6 above pi/2 by default, starts at pure noise); a final 0."""
        if height is not None or width is not None:
            self.check_size(height or self.default_size[0], width or self.default_size[1])
        return trigflow_to_flow(self.angles(num_steps)).clamp(max=1.0)

    # -- text -------------------------------------------------------------------------------------------
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
    ) -> SanaSprintCondition:
        """Encode prompts once (cached) for :meth:`velocity`.

        ``guidance_scale`` is the distilled guidance value fed to the guidance embedding (default 4.5, the
        pipeline's; no CFG, so ``negative_prompt`` has no effect). ``complex_human_instruction``: True (the
        pipeline's default list), a list, or None / [] for none. Precomputed ``prompt_embeds`` (n, L,
        caption_channels) with an optional ``prompt_attention_mask`` (n, L) may replace the prompt. With no prompt
        the condition is "" without the instruction (the unconditional caption).
        """
        w = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not w >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if negative_prompt is not None:
            warnings.warn("SANA-Sprint has no classifier-free guidance: negative_prompt has no effect (set the "
                          "distilled guidance with guidance_scale)", stacklevel=2)
        instruction = self._text_settings(complex_human_instruction, max_sequence_length)
        mask = self._given_embeds(prompt, prompt_embeds, prompt_attention_mask)
        if mask is not None:
            return SanaSprintCondition(prompt_embeds, mask, w)
        if prompt is None:
            instruction = None  # no text: the unconditional caption
        prompts = prompt_list("" if prompt is None else prompt, None, "prompt")
        key = (tuple(prompts), instruction, max_sequence_length, clean_caption)
        embeds, mask = self.cached_condition(
            key, lambda: self.pipeline.encode_prompt(
                prompts, num_images_per_prompt=1, device=self.device, clean_caption=clean_caption,
                max_sequence_length=max_sequence_length,
                complex_human_instruction=None if instruction is None else list(instruction),
            )
        )
        return SanaSprintCondition(embeds, mask, w)

    # -- velocity ---------------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma, cond: SanaSprintCondition | None = None,
                 grad: bool = False) -> torch.Tensor:
        """v = F(x_s, timestep=s, guidance=w * guidance_embeds_scale), the transformer's output: its clean estimate
        x_s - s v is the pipeline's denoised latent (see the module docstring; at s = 1 the pipeline's first level
        s_0 is read); float32 like ``x``."""
        cond = self.velocity_inputs(x, cond)
        batch = x.shape[0]
        device = self.device
        s = sigma_batch(sigma, batch, device)
        # s = 1 (pure noise) is the pipeline's first angle, at s_0 = 1.0000037 for the released 1.57080: its input
        # there is the noise times sqrt(s_0² + (1 - s_0)²), and x0_hat = x_in - s_0 F
        first = s >= 1
        timestep = torch.where(first, self.start_level(), s)
        gain = torch.where(first, torch.sqrt(timestep**2 + (1 - timestep) ** 2), torch.ones_like(s))
        embeds = repeat_for_batch(cond.prompt_embeds, batch)
        mask = repeat_for_batch(cond.prompt_attention_mask, batch)
        guidance = torch.full((batch,), cond.guidance_scale, device=device, dtype=torch.float32).to(embeds.dtype)
        guidance = guidance * self.transformer.config.guidance_embeds_scale
        with torch.set_grad_enabled(grad):
            x = x.to(device)
            x_in = x * gain.view(-1, 1, 1, 1)
            out = self._transformer(x_in, timestep, embeds, mask, guidance)
            out = torch.where(first.view(-1, 1, 1, 1), x - x_in + timestep.view(-1, 1, 1, 1) * out, out)
        return out

    # -- stochastic consistency sampling ----------------------------------------------------------------
    def consistency_sampling(self, generator: torch.Generator | None = None) -> dict[str, Callable]:
        """``callback`` and ``on_step_end`` for :func:`guidance.sampler.sample` that replace each Euler step
        by the SCM scheduler's re-noising x_{s'} = (1 - s') x0_hat + s' n, n ~ N(0, I) from ``generator`` (float32,
        drawn like ``randn_tensor``). Pass the generator that draws the initial noise to reproduce the pipeline:
        ``sample(model, cond, generator=g, **model.consistency_sampling(g))``."""
        from ..noise import check_generator, initial_noise

        check_generator(generator)
        seen: dict[str, Any] = {}

        def callback(info: dict) -> None:
            seen["x0_hat"] = info["x0_hat"]

        def on_step_end(step: int, sigma, state: dict) -> dict:
            x0_hat = seen.pop("x0_hat")
            noise = initial_noise(tuple(x0_hat.shape), generator, x0_hat.device, torch.float32)
            s = torch.as_tensor(sigma, dtype=torch.float32, device=x0_hat.device)
            return {**state, "x": (1 - s) * x0_hat + s * noise}

        return {"callback": callback, "on_step_end": on_step_end}


def _call_defaults(pipeline_class) -> dict[str, Any]:
    """The pipeline's default ``max_timesteps`` and ``intermediate_timesteps`` (from its ``__call__`` signature)."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    return {name: parameters[name].default for name in ("max_timesteps", "intermediate_timesteps")}
