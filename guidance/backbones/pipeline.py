"""Shared plumbing of the adapters that wrap a diffusers pipeline (SD3, Flux): the latent codec, the cache of
text conditions, and two switches for speed and memory:

* :meth:`PipelineFlowModel.compile`: ``torch.compile`` of the transformer. Regional compilation compiles each
  repeated block (``transformer_blocks``, ``single_transformer_blocks``) once for all its copies, which compiles
  far faster than the whole model and keeps most of the speed-up;
* :meth:`PipelineFlowModel.enable_vae_tiling`: encode and decode large images on overlapping tiles.

The pipeline's own switches keep their diffusers names and act on the wrapped pipeline: ``enable_model_cpu_offload``,
``enable_sequential_cpu_offload``, ``set_progress_bar_config``, ``save_pretrained``, ``components`` (and, from
:class:`~guidance.backbones.base.FlowModel`, ``enable_vae_slicing``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .autoencoder import LatentCodec, placement_stamp
from .base import FlowModel, casting, to_arguments


def prompt_list(prompt, n: int | None, name: str) -> list[str] | None:
    """``prompt`` (a string or a list of strings) as a list of ``n`` strings (a string is repeated); None stays None."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt] * (n or 1)
    prompt = list(prompt)
    if not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"{name} must be a string or a list of strings")
    if n is not None and len(prompt) != n:
        raise ValueError(f"{name} has {len(prompt)} entries but the prompt has {n}; give one per prompt")
    return prompt


def _requires_grad(cond: Any) -> bool:
    """True when a tensor of the condition (a dataclass of tensors, or tuples of them) requires a gradient."""
    for value in vars(cond).values() if hasattr(cond, "__dict__") else ():
        for tensor in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                return True
    return False


class PipelineFlowModel(FlowModel):
    """A flow model whose components live in a diffusers pipeline, used as they are (dtype, device,
    offloading and quantization stay the user's), with a latent codec and a cache of text conditions.

    Args:
        pipeline: the diffusers pipeline.
        decoder: optional cheaper autoencoder for :meth:`decode` (e.g. TAESD3, TAEF1).
        encoder: optional cheaper autoencoder for :meth:`encode` (e.g. TAESD3, as FLAIR's official code uses).
    """

    condition_cache_size = 16
    takes_text = True
    #: the map between images and latents; families whose pipeline normalises latents otherwise (per-channel
    #: statistics, patchifying, a 3D VAE) name their own :class:`LatentCodec` subclass here.
    codec_class: type[LatentCodec] = LatentCodec
    #: the diffusers pipeline class :meth:`from_components` builds (the family's text-to-image pipeline)
    pipeline_class: str = ""
    #: the class of what :meth:`condition` returns, which :meth:`velocity_inputs` checks
    condition_type: type | None = None
    #: latent height and width must be multiples of this for the transformer (its patch, 2 for 2x2 packing)
    latent_multiple: int = 1

    def __init__(self, pipeline, decoder=None, encoder=None):
        self.pipeline = pipeline
        self.codec = self.codec_class(pipeline.vae, decoder, encoder)
        self.spatial_factor = self.codec.spatial_factor
        self.image_channels = self.codec.image_channels
        self._conditions: OrderedDict = OrderedDict()
        self._text_batches: OrderedDict = OrderedDict()
        #: the pipeline's components that are modules, by name (fixed by the pipeline's class)
        self._module_names = tuple(name for name, component in pipeline.components.items()
                                   if isinstance(component, torch.nn.Module))
        self._placement: tuple | None = None  # (stamp, (device, dtype)) of :meth:`_placed`

    @classmethod
    def from_components(cls, decoder=None, encoder=None, **components) -> "PipelineFlowModel":
        """Build from the components of the family's pipeline (``transformer``, ``scheduler``, ``vae``, its text
        encoders and tokenizers, by the pipeline's own names)."""
        import diffusers

        return cls(getattr(diffusers, cls.pipeline_class)(**components), decoder=decoder, encoder=encoder)

    @property
    def transformer(self):
        return self.pipeline.transformer

    def check_latent_channels(self, in_channels: int, packed: int = 1) -> None:
        """The transformer must take the autoencoder's latent channels, times ``packed`` (4 for 2x2 packing)."""
        channels = self.codec.latent_channels
        if packed * channels != int(in_channels):
            how = f", packed {int(packed ** 0.5)}x{int(packed ** 0.5)} into {packed * channels}," if packed > 1 else ""
            raise ValueError(f"the VAE has {channels} latent channels{how} but the transformer takes {in_channels}; "
                             "the components do not belong together")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent for an image of ``height`` x ``width`` pixels, after :meth:`check_size`."""
        self.check_size(height, width)
        f = self.spatial_factor
        return (self.codec.latent_channels, height // f, width // f)

    def velocity_inputs(self, x: torch.Tensor, cond: Any) -> Any:
        """The condition for :meth:`velocity`: ``cond``, or the model's default (the empty prompt) when None, which
        must come from this model's :meth:`condition`; ``x`` must be (B, C, h, w) latents with h and w multiples
        of :attr:`latent_multiple`."""
        if cond is None:
            cond = self.condition()
        if self.condition_type is not None and not isinstance(cond, self.condition_type):
            raise TypeError(f"cond must come from {type(self).__name__}.condition(...), got {type(cond).__name__}")
        channels, m = self.codec.latent_channels, self.latent_multiple
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels or x.shape[2] % m \
                or x.shape[3] % m:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            sides = "" if m == 1 else " with even h and w" if m == 2 else f" with h and w multiples of {m}"
            raise ValueError(f"x must have shape (B, {channels}, h, w){sides}, got {shape}")
        return cond

    def latent_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(h, w) of the latent for an image size (each side defaults to the model's default size)."""
        _, h, w = self.latent_shape(height or self.default_size[0], width or self.default_size[1])
        return h, w

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def device(self) -> torch.device:
        """Where :meth:`velocity`, :meth:`encode` and :meth:`decode` put their inputs: the pipeline's
        ``_execution_device`` (an offload hook's execution device, else the device of its components).

        diffusers computes it, and the transformer's ``dtype``, by walking every submodule of every component, so
        both are read once and kept until the placement of a component changes. That is checked on every read
        without a walk (:func:`~guidance.backbones.autoencoder.placement_stamp`): the device and dtype of each
        component's first parameter and the offload hooks on each component. Moving or casting the pipeline, one of
        its components or the wrapper (``model.to``, ``model.pipeline.to``, ``model.pipeline.vae.to``), offloading
        through the wrapper or the pipeline, or replacing a component is seen; moving one submodule of a component
        by itself (``model.transformer.proj_out.to(...)``) is not: move whole components."""
        return self._placed()[0]

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype (read as :attr:`device` is)."""
        return self._placed()[1]

    def _placed(self) -> tuple[torch.device, torch.dtype]:
        stamp = tuple((module, placement_stamp(module)) for module in
                      (getattr(self.pipeline, name, None) for name in self._module_names)
                      if isinstance(module, torch.nn.Module))
        if self._placement is None or self._placement[0] != stamp:
            self._placement = (stamp, (self.pipeline._execution_device, self.transformer.dtype))
        return self._placement[1]

    def clear_conditions(self) -> None:
        """Drop the cached text conditions and their batched forms (:meth:`text_batch`), e.g. after a move, and
        read :attr:`device` and :attr:`dtype` again."""
        self._conditions.clear()
        self._text_batches.clear()
        self._placement = None

    def to(self, *args, **kwargs) -> "PipelineFlowModel":
        """Move / cast the whole pipeline (``pipeline.to``) and a separate decoder, in place; returns self.
        ``device`` and ``dtype`` then read the moved pipeline. Cached text conditions are dropped (they were
        computed in the old dtype). A pipeline with CPU offloading refuses a CUDA device, as diffusers does."""
        device, dtype = to_arguments(*args, **kwargs)
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if moves:
            with casting():
                self.pipeline.to(**moves)
                self.codec.to(**moves)
            self.clear_conditions()
        return self

    # -- the pipeline's own switches, under their diffusers names ------------------------------------------
    @property
    def components(self) -> dict[str, Any]:
        """The wrapped pipeline's ``components`` (``transformer``, ``vae``, ``scheduler``, text encoders, ...), as
        diffusers gives them: ``StableDiffusion3Pipeline(**model.components)`` builds the same pipeline."""
        return self.pipeline.components

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """The wrapped pipeline's ``save_pretrained`` (``kwargs``: diffusers', e.g. ``variant``): a folder that
        :func:`guidance.load_model` (and diffusers) loads back. A separate decoder or encoder (TAESD) is not
        part of the pipeline and is not written: give it to load_model again."""
        self.pipeline.save_pretrained(save_directory, **kwargs)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Turn the progress bars of flowsteer's runs on this model and of the wrapped pipeline's own calls off
        (``disable=True``) or on again (see :meth:`FlowModel.set_progress_bar_config`)."""
        super().set_progress_bar_config(disable)
        self.pipeline.set_progress_bar_config(disable=disable)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None
                                 ) -> "PipelineFlowModel":
        """The wrapped pipeline's model offloading (accelerate): the components wait on the CPU and each moves to
        the GPU while it runs; :attr:`device` then reads the pipeline's execution device, where :meth:`velocity`,
        :meth:`encode` and :meth:`decode` put their inputs. Cached text conditions are dropped (they lived on the
        old device). Without ``device``, refused in one line on a machine without a GPU (nothing to offload to);
        ``device="cpu"`` runs the offloading machinery on the CPU itself (no memory saved)."""
        self._check_offload("enable_model_cpu_offload", device)
        self.pipeline.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self.clear_conditions()
        return self

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None
                                      ) -> "PipelineFlowModel":
        """The wrapped pipeline's sequential offloading (accelerate): every submodule moves to the GPU only while
        it runs, the least memory and the slowest; otherwise as :meth:`enable_model_cpu_offload`."""
        self._check_offload("enable_sequential_cpu_offload", device)
        self.pipeline.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        self.clear_conditions()
        return self

    @staticmethod
    def _check_offload(what: str, device) -> None:
        """diffusers' offloading moves each component to an accelerator while it runs: without a ``device`` it
        needs CUDA (or Metal) here, and diffusers' own error ("requires accelerator, but not found") comes only
        after it has touched the pipeline; refuse in one line first. A named device is checked as everywhere
        (:func:`guidance.loading.devices.check_device`); ``device="cpu"`` offloads to the CPU itself (nothing is
        saved, every call works)."""
        from ..loading.devices import check_device

        if device is not None:
            check_device(device)
        elif not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            raise ValueError(f"{what} keeps the weights on the CPU and moves each component to a GPU while it runs, "
                             f"but there is no GPU here; run on the CPU as the model is (model.to('cpu'))")

    #: Attributes of a transformer holding its repeated blocks (SD3: joint blocks; Flux: double and single).
    repeated_blocks = ("transformer_blocks", "single_transformer_blocks")

    def compile(self, regional: bool = True, **options) -> "PipelineFlowModel":
        """``torch.compile`` the transformer in place (``options`` go to ``torch.compile``, e.g. ``mode``,
        ``dynamic``, ``backend``). ``regional=True`` compiles every block of ``transformer_blocks`` and
        ``single_transformer_blocks`` instead of the whole model: identical blocks share one compiled graph, so
        compilation takes seconds rather than minutes. Results equal the eager ones up to float rounding; the
        first call at each new shape compiles (a warm-up)."""
        blocks = [block for name in self.repeated_blocks for block in getattr(self.transformer, name, None) or ()]
        if not regional:
            self.transformer.compile(**options)
        elif not blocks:
            raise ValueError(f"{type(self.transformer).__name__} has no {' or '.join(self.repeated_blocks)} to "
                             f"compile one by one; use compile(regional=False)")
        else:
            for block in blocks:
                block.compile(**options)
        return self

    def enable_vae_tiling(self, tile_size: int | None = None, overlap: float | None = None) -> "PipelineFlowModel":
        """Encode and decode on overlapping tiles of ``tile_size`` pixels (default: the autoencoder's own), which
        bounds the autoencoder's memory for large images (see :func:`~guidance.backbones.autoencoder.set_tiling`)."""
        self.codec.enable_tiling(tile_size, overlap)
        return self

    def disable_vae_tiling(self) -> "PipelineFlowModel":
        """Encode and decode whole images again."""
        self.codec.disable_tiling()
        return self

    def cached_condition(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The condition stored under ``key``, made once by ``make()`` (least recently used ones are dropped)."""
        if key in self._conditions:
            self._conditions.move_to_end(key)
            return self._conditions[key]
        cond = self._conditions[key] = make()
        if len(self._conditions) > self.condition_cache_size:
            self._conditions.popitem(last=False)
        return cond

    def text_batch(self, cond: Any, batch: int, make: Callable[[], tuple], shape: Hashable = None) -> tuple:
        """The transformer's text inputs for ``cond`` and ``batch`` latents (the prompts' embeddings repeated for
        the batch and, under CFG, stacked with their negatives, on the model's device and dtype), made once by
        ``make()`` per condition, batch, device, dtype and ``shape`` (what else they depend on, e.g. the number of
        image tokens of a joint attention mask) and reused at every step, so that a step concatenates only the
        latents. The condition itself is kept with its inputs (its identity cannot be taken by another
        object while they are stored), and with its fields (the tensors by identity, the rest by value: a run's
        own condition whose embeddings or guidance scale a diffusers callback replaces gets new inputs); least
        recently used ones are dropped, and all with the cached conditions (:meth:`clear_conditions`). A
        condition with a tensor that requires a gradient (embeddings being optimised) gets its inputs made anew
        at every call, so that each step's graph is its own."""
        if _requires_grad(cond):
            return make()
        device, dtype = self._placed()
        key = (id(cond), batch, device, dtype, shape)
        fields = tuple(id(v) if isinstance(v, torch.Tensor) else v for v in vars(cond).values()) \
            if hasattr(cond, "__dict__") else ()
        kept = self._text_batches.get(key)
        if kept is not None and kept[0] is cond and kept[1] == fields:
            self._text_batches.move_to_end(key)
            return kept[2]
        inputs = make()
        self._text_batches[key] = (cond, fields, inputs)
        if len(self._text_batches) > self.condition_cache_size:
            self._text_batches.popitem(last=False)
        return inputs

    def _check_embeds(self, embeds, pooled, name: str, pooled_name: str) -> None:
        """Precomputed text embeddings must fit the transformer: (B, tokens, joint_attention_dim) and
        (B, pooled_projection_dim)."""
        config = self.transformer.config
        if embeds is None or pooled is None:
            raise ValueError(f"{name} and {pooled_name} must be given together")
        if embeds.ndim != 3 or embeds.shape[-1] != config.joint_attention_dim:
            raise ValueError(
                f"{name} must have shape (batch, tokens, {config.joint_attention_dim}), got {tuple(embeds.shape)}"
            )
        if pooled.ndim != 2 or pooled.shape != (embeds.shape[0], config.pooled_projection_dim):
            raise ValueError(
                f"{pooled_name} must have shape ({embeds.shape[0]}, {config.pooled_projection_dim}), "
                f"got {tuple(pooled.shape)}"
            )

    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (E(x) - shift) * scale; a posterior sample with ``generator``, the mean without."""
        self.codec.check_image(image)
        self.check_size(int(image.shape[-2]), int(image.shape[-1]))
        return self.codec.encode(image, generator).to(image.device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """x = D(z / scale + shift) in about [-1, 1], float32."""
        return self.codec.decode(latent).to(latent.device)
