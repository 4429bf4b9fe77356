"""The backbone registry: one entry per model family flowsteer has an adapter for.

:func:`guidance.load_model` reads it to tell a folder's family from the ``_class_name`` of its
``model_index.json`` (one of the family's ``pipelines``, or of ``also_loads``: pipelines of the same components),
to pick the diffusers pipeline class that loads it, and to wrap a pipeline object by its class (or, for a class
of its own, by the class of its transformer). Pipelines that hold a family's components but need inputs a flow
model does not take (a reference image, a mask, a control image) are in :data:`REFUSED` with the reason, and
load_model refuses them in one line. ``flowsteer models`` lists the families with their defaults and the known
checkpoints. Adding a backbone family is one adapter file in this folder plus one entry in :data:`BACKBONES`,
one builder file of its random-weight models in ``tasks/random_models/`` (named as the adapter, with its row in
``TINY_PIPELINES``) and one test file.

Nothing here imports diffusers or an adapter: classes are named by strings and imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

__all__ = ["BACKBONES", "REFUSED", "Backbone", "family_for_index", "family_for_pipeline", "get_backbone",
           "known_models", "pipeline_families", "refusal", "supported_pipelines"]


@dataclass(frozen=True)
class Backbone:
    """One model family.

    Attributes:
        name: the family's short name (``load_model``'s kind, the family column of ``flowsteer models``).
        title: how messages name its pipelines ("Stable Diffusion 3 / 3.5"); empty for families without one.
        short: how messages name its transformer ("SD3").
        adapter: ``"module:Class"`` of the :class:`~guidance.backbones.base.FlowModel` adapter.
        pipelines: the diffusers text-to-image pipeline classes the adapter wraps; a folder whose index names one
            is loaded with that class.
        transformer: the diffusers transformer class that marks a pipeline object of the family whose own class
            is not listed (a user's subclass or custom pipeline).
        also_loads: pipeline classes of the same components (img2img, inpainting variants) whose folders are
            loaded with ``pipelines[0]``.
        checkpoints: (hub id or source, one-line summary) of the known checkpoints, as ``flowsteer models`` lists
            them.
        default_size: the pipeline's default image side in pixels.
        default_steps: the steps the pipeline (or the model card) uses by default.
        default_guidance: the pipeline's guidance default, in words ("CFG 7", "distilled guidance 3.5").
        notes: what a guidance method cannot do on this family, in one line (empty: every method works).
    """

    name: str
    adapter: str
    title: str = ""
    short: str = ""
    pipelines: tuple[str, ...] = ()
    transformer: str | None = None
    also_loads: tuple[str, ...] = ()
    checkpoints: tuple[tuple[str, str], ...] = ()
    default_size: int | None = None
    default_steps: int | None = None
    default_guidance: str = ""
    notes: str = ""

    @property
    def pipeline(self) -> str | None:
        """The pipeline class that loads a folder of the family (the first of ``pipelines``)."""
        return self.pipelines[0] if self.pipelines else None

    def adapter_class(self) -> type:
        module, _, name = self.adapter.partition(":")
        return getattr(import_module(module), name)

    def pipeline_class(self, name: str | None = None) -> type:
        import diffusers

        return getattr(diffusers, name or self.pipeline)

    def transformer_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer)


#: Every family, in the order ``flowsteer models`` lists them.
BACKBONES: tuple[Backbone, ...] = (
    Backbone("embedded", "guidance.backbones.generic:GenericFlowModel",
             checkpoints=(("default", "flowsteer's own small latent rectified-flow prior (no download)"),),
             default_size=64, default_steps=28, default_guidance="none (unconditional)",
             notes="unconditional: no prompt, so no editing"),
    Backbone("sd3", "guidance.backbones.sd3:SD3Model", "Stable Diffusion 3 / 3.5", "SD3",
             ("StableDiffusion3Pipeline",), "SD3Transformer2DModel",
             ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
             (("stabilityai/stable-diffusion-3-medium-diffusers", "SD3 medium, 1024², 28 steps, CFG 7"),
              ("stabilityai/stable-diffusion-3.5-medium", "SD3.5 medium, 1024², 40 steps, CFG 4.5"),
              ("stabilityai/stable-diffusion-3.5-large", "SD3.5 large (qk-norm), 1024², 28 steps, CFG 3.5"),
              ("stabilityai/stable-diffusion-3.5-large-turbo", "SD3.5 large turbo, 4 steps, CFG off")),
             1024, 28, "CFG 7"),
    Backbone("flux", "guidance.backbones.flux:FluxModel", "FLUX.1", "Flux", ("FluxPipeline",),
             "FluxTransformer2DModel", ("FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline"),
             (("black-forest-labs/FLUX.1-dev", "Flux dev, guidance-distilled, 28-50 steps"),
              ("black-forest-labs/FLUX.1-schnell", "Flux schnell, 1-4 steps"),
              ("black-forest-labs/FLUX.1-Kontext-dev", "Kontext dev, text-to-image only (no reference image)")),
             1024, 28, "distilled guidance 3.5 (dev); none (schnell)",
             "guidance-distilled: no CFG unless true_cfg_scale > 1 with a negative prompt; Kontext weights sample "
             "text-to-image, without its reference-image input"),
    Backbone("flux2", "guidance.backbones.flux2:Flux2Model", "FLUX.2", "Flux2",
             ("Flux2Pipeline", "Flux2KleinPipeline"), "Flux2Transformer2DModel", (),
             (("black-forest-labs/FLUX.2-dev", "FLUX.2 dev, 32B, Mistral-Small-3.1 text encoder, distilled guidance"),
              ("black-forest-labs/FLUX.2-klein-4B", "FLUX.2 klein 4B, Qwen3 text encoder, step-distilled (4 steps)"),
              ("black-forest-labs/FLUX.2-klein-9B", "FLUX.2 klein 9B, Qwen3 text encoder, step-distilled (4 steps)"),
              ("black-forest-labs/FLUX.2-klein-base-4B", "FLUX.2 klein base 4B, not distilled, CFG 4, 50 steps")),
             1024, 50, "distilled guidance 4 (dev); CFG 4 (klein base); none (klein, 4 steps)",
             "dev and step-distilled klein take no CFG (a negative prompt is refused); reference-image inputs are "
             "refused; latents are the patchified, batch-normalised 128-channel grid (factor 16)"),
    Backbone("qwen_image", "guidance.backbones.qwen_image:QwenImageModel", "Qwen-Image", "QwenImage",
             ("QwenImagePipeline",), "QwenImageTransformer2DModel", ("QwenImageImg2ImgPipeline",
                                                                      "QwenImageInpaintPipeline"),
             (("Qwen/Qwen-Image", "Qwen-Image 20B, Qwen2.5-VL text encoder, true CFG 4"),),
             1024, 50, "true CFG 4 with a negative prompt",
             "CFG is true_cfg_scale with a negative prompt (guidance_scale is the distilled value, unused by the "
             "released model); the VAE is 3D (one frame) and its decoder clamps to [-1, 1]; 2 steps or more"),
    Backbone("z_image", "guidance.backbones.z_image:ZImageModel", "Z-Image", "ZImage",
             ("ZImagePipeline",), "ZImageTransformer2DModel", ("ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
             (("Tongyi-MAI/Z-Image-Turbo", "Z-Image Turbo 6B, Qwen3 text encoder, 8 steps, CFG off"),),
             1024, 50, "CFG 5 (Turbo: 8 steps, CFG off)",
             "CFG is v_c + w (v_c - v_u), on for w > 0; Turbo runs without it"),
    Backbone("sana", "guidance.backbones.sana:SanaModel", "SANA", "Sana", ("SanaPipeline",),
             "SanaTransformer2DModel", (),
             (("Efficient-Large-Model/Sana_1600M_1024px_diffusers", "SANA 1.6B, Gemma-2 text encoder, DC-AE f32"),
              ("Efficient-Large-Model/Sana_600M_1024px_diffusers", "SANA 0.6B")),
             1024, 20, "CFG 4.5",
             "DC-AE f32: sides are multiples of 32 and encoding is deterministic; with the released DPM-Solver "
             "scheduler flowsteer takes Euler steps on the same sigmas"),
    Backbone("sana_sprint", "guidance.backbones.sana_sprint:SanaSprintModel", "SANA-Sprint", "SanaSprint",
             ("SanaSprintPipeline",), "SanaTransformer2DModel", ("SanaSprintImg2ImgPipeline",),
             (("Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers", "SANA-Sprint 1.6B, 1-4 steps (sCM)"),
              ("Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers", "SANA-Sprint 0.6B, 1-4 steps (sCM)")),
             1024, 2, "distilled guidance 4.5",
             "guidance-distilled, no CFG; the pipeline's stochastic multi-step sCM sampling is "
             "SanaSprintModel.consistency_sampling (flowsteer's methods take Euler steps)"),
    Backbone("lumina2", "guidance.backbones.lumina2:Lumina2Model", "Lumina-Image 2.0", "Lumina2",
             ("Lumina2Pipeline",), "Lumina2Transformer2DModel", (),
             (("Alpha-VLLM/Lumina-Image-2.0", "Lumina-Image 2.0, 2.6B, Gemma-2 text encoder"),),
             1024, 30, "CFG 4 with renormalisation",
             "cfg_trunc_ratio < 1 needs num_steps in condition() (the pipeline truncates by step index)"),
    Backbone("chroma", "guidance.backbones.chroma:ChromaModel", "Chroma", "Chroma", ("ChromaPipeline",),
             "ChromaTransformer2DModel", ("ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
             (("lodestones/Chroma1-HD", "Chroma1 HD 8.9B, T5 only, true CFG"),
              ("lodestones/Chroma1-Base", "Chroma1 base 8.9B")),
             1024, 35, "CFG 5",
             "the pipeline's text mask weakens padding tokens rather than removing them; kept for parity"),
    Backbone("generic", "guidance.backbones.generic:GenericFlowModel"),
)

#: Pipelines of a family's components that need inputs a flow model v(x, s, c) does not take: the reason, and
#: what to use instead.
REFUSED: dict[str, str] = {
    "FluxFillPipeline": "FLUX.1 Fill's transformer takes the masked image and the mask beside the latent "
                        "(384 input channels); restore with FLUX.1-dev and an inpainting operator instead",
    "FluxControlPipeline": "FLUX.1 Canny / Depth take a control image in extra input channels",
    "FluxPriorReduxPipeline": "Redux is an image encoder, not a flow model",
    "QwenImageEditPipeline": "Qwen-Image-Edit is conditioned on the input image's tokens; use Qwen-Image "
                             "(QwenImagePipeline) with flowchef_edit",
    "QwenImageEditPlusPipeline": "Qwen-Image-Edit is conditioned on the input images' tokens; use Qwen-Image "
                                 "(QwenImagePipeline) with flowchef_edit",
    "QwenImageLayeredPipeline": "Qwen-Image-Layered decomposes an input image into layers, not a flow model "
                                "v(x, s, c)",
    "StableDiffusion3ControlNetPipeline": "ControlNet residuals need a control image at every step",
}


def get_backbone(name: str) -> Backbone:
    for backbone in BACKBONES:
        if backbone.name == name:
            return backbone
    raise ValueError(f"unknown backbone family {name!r}; known: {[b.name for b in BACKBONES]}")


def pipeline_families() -> tuple[Backbone, ...]:
    """The families loaded as a whole diffusers pipeline (pipeline classes and a transformer class)."""
    return tuple(b for b in BACKBONES if b.pipelines and b.transformer)


def supported_pipelines() -> tuple[str, ...]:
    """Every pipeline class a folder or object may be, in registry order."""
    return tuple(name for b in pipeline_families() for name in b.pipelines + b.also_loads)


def refusal(class_name: str) -> str | None:
    """The one-line refusal of a pipeline class listed in :data:`REFUSED` (None for others)."""
    if class_name not in REFUSED:
        return None
    return (f"{class_name} is not supported: {REFUSED[class_name]}. Supported pipelines: "
            f"{', '.join(supported_pipelines())}")


def family_for_index(index: dict) -> tuple[Backbone, str] | None:
    """(family, pipeline class to load it with) for a folder's ``model_index.json``, by its ``_class_name``;
    None when no family lists it."""
    name = str(index.get("_class_name", ""))
    for backbone in pipeline_families():
        if name in backbone.pipelines:
            return backbone, name
        if name in backbone.also_loads:
            return backbone, backbone.pipeline
    return None


def family_for_pipeline(pipe) -> Backbone | None:
    """The family of a pipeline object: by its class (or a base class) among the families' pipelines, else by the
    class of its transformer; None when neither matches."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    for backbone in pipeline_families():
        if names & set(backbone.pipelines + backbone.also_loads):
            return backbone
    transformer = getattr(pipe, "transformer", None)
    for backbone in pipeline_families():
        if transformer is not None and isinstance(transformer, backbone.transformer_class()):
            return backbone
    return None


def known_models() -> tuple[tuple[str, str, str], ...]:
    """(source, family, summary) of every known checkpoint, for ``flowsteer models``."""
    return tuple((source, b.name, summary) for b in BACKBONES for source, summary in b.checkpoints)
