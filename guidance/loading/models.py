"""Build a flow model from a hub id, a local folder or an already-built diffusers pipeline.

    load_model("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16, device="cuda")
    load_model("/data/flux1-dev")                   # a folder written by save_pretrained / hf download
    load_model(pipe)                                # reuse a FluxPipeline, Flux2KleinPipeline, ... as it is

The kind of model is read from the ``_class_name`` of the folder's ``model_index.json`` (or the class of a
pipeline object): each family of :mod:`guidance.backbones.registry` (SD3 / 3.5, FLUX.1, FLUX.2, Qwen-Image,
Z-Image, SANA, SANA-Sprint, Lumina 2, Chroma) lists the pipeline classes its adapter wraps, pipelines that need
inputs a flow model does not take (Kontext, Fill, the Qwen-Image edit pipelines, ...) are refused with the
reason, and a folder whose index lists a ``unet`` or ``transformer`` (plus optional ``vae`` and ``scheduler``)
without text encoders gives a :class:`~guidance.backbones.generic.GenericFlowModel`. Only safetensors weights are
loaded and no remote code is ever run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from .devices import check_device, check_dtype
from .manifest import DamagedModelError, verify_manifest
from .sources import ModelNotFoundError, classify_index, hub_errors, hub_offline, not_found, read_index
from ..backbones.base import FlowModel, casting
from ..backbones.registry import (family_for_pipeline, get_backbone, pipeline_families, refusal,
                                 supported_pipelines)

__all__ = ["DamagedModelError", "ModelNotFoundError", "check_finite_weights", "hub_offline", "load_decoder",
           "load_model", "quiet_loading"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@contextlib.contextmanager
def quiet_loading(enabled: bool = True):
    """Switch transformers' and diffusers' weight-loading progress bars off and their logging to errors only
    (flowsteer's own tqdm bars stay); the previous settings come back afterwards."""
    saved = []
    if enabled:
        for name in ("transformers", "diffusers"):
            try:
                logging = import_module(f"{name}.utils.logging")
            except ImportError:
                continue
            saved.append((logging, logging.is_progress_bar_enabled(), logging.get_verbosity()))
            logging.disable_progress_bar()
            logging.set_verbosity_error()
    try:
        yield
    finally:
        for logging, bar, verbosity in saved:
            if bar:
                logging.enable_progress_bar()
            logging.set_verbosity(verbosity)


def _dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The weights-dtype keyword of ``from_pretrained``: ``dtype`` in recent diffusers, ``torch_dtype`` before."""
    if dtype is None:
        return {}
    import diffusers
    from packaging.version import Version

    try:
        from diffusers.utils import deprecation_utils

        renamed = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:  # pragma: no cover
        renamed = False
    renamed = renamed or Version(diffusers.__version__).major >= 1
    return {"dtype" if renamed else "torch_dtype": dtype}


#: ``_class_name``s of text-free folders that flowsteer writes itself (the default model); the generic adapter loads
#: them without a word, as it does any folder whose index has a ``"flowsteer"`` entry (its adapter settings)
GENERIC_PIPELINES = ("FlowsteerDefaultPipeline",)


def _warn_generic(source: str, index: dict) -> None:
    """An index whose ``_class_name`` flowsteer does not know, loaded by the generic adapter: say so, once."""
    name = index.get("_class_name")
    if "flowsteer" in index or name in GENERIC_PIPELINES:
        return
    network = "transformer" if "transformer" in index else "unet"
    warnings.warn(f"the pipeline class {str(name) if name else '(no _class_name)'!r} of {source!r} is not one "
                  f"flowsteer knows; its {network}, vae and scheduler are loaded with the generic adapter "
                  f"(GenericFlowModel); to make that explicit (and silence this), add \"flowsteer\": {{}} to its "
                  f"model_index.json", UserWarning, stacklevel=3)


#: safetensors' names of the floating dtypes a checkpoint may be stored in
_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _weights_header(source: str, component: str, local_files_only: bool) -> dict:
    """The safetensors header ({tensor: {"dtype", "shape", ...}}) of the first weights file of ``component`` in a
    local folder or a hub repository (the file loading fetches anyway); {} when there is none to read."""
    from huggingface_hub import hf_hub_download

    def fetch(name: str) -> Path:
        if Path(source).is_dir():
            return Path(source, component, name)
        offline = local_files_only or hub_offline()
        return Path(hf_hub_download(repo_id=source, filename=f"{component}/{name}", local_files_only=offline))

    weights = "diffusion_pytorch_model.safetensors"
    try:
        file = fetch(weights + ".index.json")
        if file.is_file():
            shards = json.loads(file.read_text()).get("weight_map", {})
            weights = sorted(set(shards.values()))[0]
    except (*hub_errors(), ValueError, AttributeError, IndexError):
        pass
    try:
        with open(fetch(weights), "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
    except (*hub_errors(), ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def _stored_dtype(source: str, index: dict, local_files_only: bool) -> torch.dtype:
    """``dtype="auto"``: the floating dtype the denoiser's weights (``transformer`` or ``unet``) are stored in, the
    one holding most of its values, read from its safetensors header; float32 where no file records one."""
    component = "transformer" if "transformer" in index else "unet"
    sizes: dict[torch.dtype, int] = {}
    for name, entry in _weights_header(source, component, local_files_only).items():
        stored = _STORED_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) and name != "__metadata__" else None
        if stored is not None:
            sizes[stored] = sizes.get(stored, 0) + math.prod(entry.get("shape") or [1])
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _is_auto(dtype) -> bool:
    return isinstance(dtype, str) and dtype.strip().lower() == "auto"


def _from_pretrained(cls, source: str, local_files_only: bool, **kwargs):
    """``cls.from_pretrained`` with safetensors only; missing weights become a ModelNotFoundError, and a local
    folder that fails to load a DamagedModelError naming the folder and the part."""
    offline = local_files_only or hub_offline()
    try:
        return cls.from_pretrained(source, local_files_only=offline, **kwargs)
    except Exception as error:
        if Path(source).is_dir():
            raise _damaged(source, kwargs.get("subfolder"), error) from None
        if isinstance(error, hub_errors()):
            raise not_found(source, error, offline) from None
        raise


def _damaged(folder: str, subfolder: str | None, error: BaseException) -> DamagedModelError:
    """A local folder whose files do not load: name the folder, the component and the loader's own first line."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    part = f" (component {subfolder!r})" if subfolder else ""
    return DamagedModelError(f"the model folder {folder}{part} is damaged or incomplete: {type(error).__name__}: "
                             f"{first}; restore the folder (save_pretrained or `hf download ID --local-dir "
                             f"{folder}`)")


def _weights_file(source: str, component: str | None, parameter: str) -> str:
    """The safetensors file of ``component`` in the folder ``source`` that holds ``parameter`` (by the shards'
    index when there are several), else the component's folder."""
    folder = Path(source, component) if component else Path(source)
    if not folder.is_dir():
        return f"{source}/{component}" if component else str(source)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shard = json.loads(index.read_text()).get("weight_map", {}).get(parameter)
        except (OSError, ValueError, AttributeError):
            shard = None
        if shard:
            return str(folder / shard)
    files = sorted(folder.glob("*.safetensors"))
    return str(files[0]) if len(files) == 1 else str(folder)


def check_finite_weights(modules: dict[str, Any], source: str) -> None:
    """One pass over the parameters and persistent buffers of the loaded ``modules`` ({component: module}): a
    weight file with NaN or infinite values (damaged on disk, with no manifest.json to catch it) is refused in one
    line naming the component and the file, instead of diverging at the first step."""
    for component, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            continue
        named = [(n, t) for n, t in module.state_dict(keep_vars=True).items()
                 if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" and t.numel()]
        if not named:
            continue
        flags = [torch.isfinite(t).all() for _, t in named]
        finite = torch.stack([f.to(flags[0].device) for f in flags])
        if bool(finite.all()):  # one synchronisation per component
            continue
        parameter = named[int((~finite).nonzero()[0, 0])][0]
        subfolder = component if component and Path(source, component).is_dir() else None
        file = _weights_file(source, subfolder, parameter)
        raise DamagedModelError(f"the weights of component {component!r} are damaged: {file} holds NaN or infinite "
                                f"values (in {parameter}); restore the file (copy it again, or `hf download ID "
                                f"--local-dir FOLDER`)")


def load_decoder(decoder, *, dtype: torch.dtype | None = None, device=None, local_files_only: bool = False):
    """A cheap autoencoder (diffusers ``AutoencoderTiny``, e.g. 'madebyollin/taesd3') from an id, folder or object,
    used to decode (``decoder=``) or encode (``encoder=``)."""
    if decoder is None:
        return None
    if isinstance(decoder, (str, os.PathLike)):
        from diffusers import AutoencoderTiny

        source = str(decoder)
        decoder = _from_pretrained(AutoencoderTiny, source, local_files_only, use_safetensors=True,
                                   **_dtype_kwargs(dtype))
        check_finite_weights({"decoder": decoder}, source)
    elif not (hasattr(decoder, "decode") and hasattr(decoder, "config")):
        raise ValueError(
            f"decoder must be a hub id, a folder or a diffusers autoencoder, got {type(decoder).__name__}"
        )
    if device is not None or dtype is not None:
        decoder = decoder.to(device=device, dtype=dtype)
    return decoder


def _autoencoders(decoder, encoder, **kwargs) -> tuple[Any, Any]:
    """(decoder, encoder) loaded by :func:`load_decoder`; the same id or folder for both loads one module. Weights
    that are not on this machine give a ModelNotFoundError that says how to go without them."""
    def load(module, role):
        try:
            return load_decoder(module, **kwargs)
        except ModelNotFoundError as error:
            raise ModelNotFoundError(f"{error} It was asked for as the {role} (TAESD3 is FLAIR's official "
                                     f"{role}); to use the model's own VAE instead, pass {role}=None "
                                     f"(--{role} none).") from None

    loaded = load(decoder, "decoder")
    if encoder is None:
        return loaded, None
    if isinstance(encoder, (str, os.PathLike)) and isinstance(decoder, (str, os.PathLike)) \
            and os.fspath(encoder) == os.fspath(decoder):
        return loaded, loaded
    return loaded, load(encoder, "encoder")


def _adapter_for_pipeline(pipe, decoder, encoder=None) -> FlowModel:
    """The adapter of the pipeline's family (by its class, else by its transformer's class)."""
    refused = refusal(type(pipe).__name__)
    if refused:
        raise ValueError(refused)
    family = family_for_pipeline(pipe)
    if family is None:
        families = pipeline_families()
        raise ValueError(
            f"unsupported pipeline {type(pipe).__name__}: pass one of {', '.join(supported_pipelines())} (or a "
            f"pipeline with a {' / '.join(b.transformer for b in families)}), or wrap the network with "
            "GenericFlowModel"
        )
    return family.adapter_class()(pipe, decoder=decoder, encoder=encoder)


def _load_generic(source: str, index: dict, dtype, local_files_only: bool):
    """(network, vae or None, scheduler or None) of a text-free folder; diffusers classes only."""
    import diffusers

    def component(name: str, is_model: bool):
        entry = index.get(name)
        if not entry or entry[0] is None:
            return None
        library, class_name = entry[0], entry[1]
        if library != "diffusers" or not hasattr(diffusers, class_name):
            raise ValueError(
                f"component {name!r} of {source!r} is {library}.{class_name}; only diffusers classes are loaded "
                "(no remote code)"
            )
        cls = getattr(diffusers, class_name)
        if is_model:
            return _from_pretrained(cls, source, local_files_only, subfolder=name, use_safetensors=True,
                                    **_dtype_kwargs(dtype))
        return _from_pretrained(cls, source, local_files_only, subfolder=name)

    network = component("transformer" if "transformer" in index else "unet", True).eval()
    vae = component("vae", True)
    return network, (vae.eval() if vae is not None else None), component("scheduler", False)


def load_model(
    source: Any,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    local_files_only: bool = False,
    decoder: Any = None,
    encoder: Any = None,
    torch_dtype: torch.dtype | str | None = None,
    memory: str | None = None,
    **options,
) -> FlowModel:
    """Build a :class:`~guidance.backbones.base.FlowModel`.

    Args:
        source: a hub id ("stabilityai/stable-diffusion-3.5-medium"), a local folder with a
            ``model_index.json``, a diffusers pipeline object of a supported family (``FluxPipeline``,
            ``QwenImagePipeline``, ...; its components are reused, nothing is reloaded), or a FlowModel (returned
            as is).
        dtype: weights dtype when loading (e.g. ``torch.bfloat16``, or a name: ``"bf16"``); for a pipeline object, a
            cast. ``torch_dtype`` is accepted for it, as diffusers names it. ``"auto"``: the dtype the checkpoint
            stores its denoiser's weights in (``transformer`` or ``unet``, read from its safetensors header, the
            dtype holding most values), float32 where no file records one; a pipeline object keeps its own. (diffusers
            itself reads no dtype from a checkpoint and loads float32 without one.)
        device: where to put the model; for a pipeline object left alone when None (keeps its offloading).
        local_files_only: never reach the network (``HF_HUB_OFFLINE=1`` does the same).
        decoder: None (the full VAE decodes) or a tiny autoencoder (``AutoencoderTiny``: id, folder or object)
            used by ``decode``, e.g. "madebyollin/taesd3" for SD3.
        encoder: the same for ``encode`` (None: the full VAE encodes). FLAIR's official code decodes and encodes
            with TAESD3: ``decoder="madebyollin/taesd3", encoder="madebyollin/taesd3"`` (loaded once).
        memory: a memory profile of :data:`guidance.memory_profiles.PROFILES` ("none", "balanced", "low", "8bit",
            "4bit", "minimal"), applied after loading on ``device`` (default: CUDA when available, else the CPU): the
            offloading profiles keep weights on the CPU and move each part to the device while it runs, the
            quantising ones store the transformer blocks' linear weights in 8 or 4 bits. ``"auto"``: the lightest
            profile whose planned peak of unguided sampling at the family's size fits the device's free memory
            (:mod:`guidance.memory_estimate`), refused in one line when none fits. None: no profile (a pipeline
            object keeps its own placement).
        options: for pipeline sources (SD3, Flux, ...), passed to the pipeline's ``from_pretrained`` (e.g.
            ``variant="fp16"``, or ``text_encoder_3=None, tokenizer_3=None`` to run SD3 without T5); for generic
            folders, passed to :class:`~guidance.backbones.generic.GenericFlowModel` (``timestep_scale``, ``shift``,
            ...).

    Raises:
        ModelNotFoundError: the weights are not on this machine (the message says how to get them).
        ValueError: the source is of an unknown kind or an unsupported pipeline, or no memory profile fits.
    """
    from diffusers import DiffusionPipeline

    from ..memory_profiles import AUTO, apply_profile, check_profile

    if torch_dtype is not None:
        if dtype is not None and (_is_auto(dtype) != _is_auto(torch_dtype) or not _is_auto(dtype)
                                  and check_dtype(dtype) != check_dtype(torch_dtype)):
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them")
        dtype = torch_dtype
    auto = _is_auto(dtype)
    dtype, device = (None if auto else check_dtype(dtype)), check_device(device)
    if isinstance(source, str) and not source.strip():
        raise ValueError("the model source is empty: give a hub id, a local folder or 'default'")
    if isinstance(source, FlowModel):
        if decoder is not None or encoder is not None or options or memory is not None:
            raise ValueError("a FlowModel is returned as it is; decoder, encoder, memory and options apply only when "
                             "loading (apply a profile to a loaded model with guidance.memory_profiles.apply_profile)")
        return source
    if memory is not None:
        memory = check_profile(memory)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if memory == AUTO:
        from ..memory import check_plan

        memory = check_plan(source, "unguided", None, None, 1, AUTO, device=device, dtype=dtype,
                            local_files_only=local_files_only, what="sampling run") or "none"
    placed = memory not in (None, "none")  # the profile places the weights, not this function

    def finish(model: FlowModel) -> FlowModel:
        if placed:
            return apply_profile(model, memory, device)
        if memory is not None:
            model.memory_profile = memory
        return model

    if isinstance(source, DiffusionPipeline):
        if options:
            raise ValueError(f"options {sorted(options)} apply only when loading from an id or folder")
        if (device is not None and not placed) or dtype is not None:
            with casting():
                source = source.to(device=None if placed else device, dtype=dtype)
        decoder, encoder = _autoencoders(decoder, encoder, dtype=dtype, device=device or source._execution_device,
                                         local_files_only=local_files_only)
        return finish(_adapter_for_pipeline(source, decoder, encoder))

    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"unknown model source of type {type(source).__name__}: pass a hub id, a local folder, "
            f"a diffusers pipeline ({', '.join(supported_pipelines())}), or a FlowModel"
        )
    source = os.fspath(source)
    if source == "default":
        from ..backbones.default import DefaultModelError, _restore_hint, check_default_model

        folder = check_default_model(verify=False)  # the files are there; their manifest is checked on loading
        try:
            model = load_model(str(folder), dtype="auto" if auto else dtype, device=device, local_files_only=True,
                               decoder=decoder, encoder=encoder, memory=memory, **options)
        except DamagedModelError as error:
            raise DefaultModelError(f"the default model: {error}. " + _restore_hint(folder)) from None
        model.name_or_path = "default"
        return model
    path = Path(source).expanduser()
    if path.is_file():
        raise ValueError(
            f"{source!r} is a file; single-file checkpoints are not loaded here: build a pipeline with "
            "StableDiffusion3Pipeline.from_single_file / FluxPipeline.from_single_file and pass that object"
        )
    if not path.is_dir():
        looks_like_path = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 \
            or (len(path.parts) > 1 and path.parent.is_dir())  # "out/model" where out/ is a folder here
        if looks_like_path or "\\" in source or not _HUB_ID.match(source):
            raise ModelNotFoundError(
                f"no such folder: {source!r}; pass an existing model folder (written by save_pretrained or "
                "`hf download ID --local-dir FOLDER`) or a hub id like 'stabilityai/stable-diffusion-3.5-medium'"
            )
    else:
        source = str(path)
        verify_manifest(path)  # a folder with a manifest.json has its weights checked before they load

    index = read_index(source, local_files_only)
    kind, pipeline_class = classify_index(index)
    if auto:
        dtype = _stored_dtype(source, index, local_files_only)
    if kind == "generic":
        _warn_generic(source, index)
        network, vae, scheduler = _load_generic(source, index, dtype, local_files_only)
        if device is not None and not placed:
            network = network.to(device)
            vae = vae.to(device) if vae is not None else None
        check_finite_weights({"transformer" if "transformer" in index else "unet": network, "vae": vae}, source)
        model_device = next(network.parameters()).device
        decoder, encoder = _autoencoders(decoder, encoder, dtype=dtype, device=device or model_device,
                                         local_files_only=local_files_only)
        options.setdefault("scheduler", scheduler)
        for key, value in (index.get("flowsteer") or {}).items():  # the folder's own adapter settings
            options.setdefault(key, value)
        model = get_backbone(kind).adapter_class()(network, vae, decoder=decoder, encoder=encoder, **options)
        model.name_or_path = source
        if Path(source, "calibration").is_dir():
            model.calibration_dir = Path(source, "calibration")
        return finish(model)

    pipe = _from_pretrained(get_backbone(kind).pipeline_class(pipeline_class), source, local_files_only,
                            use_safetensors=True, **_dtype_kwargs(dtype), **options)
    if device is not None and not placed:
        pipe = pipe.to(device)
    check_finite_weights(pipe.components, source)  # on the device: one cheap pass
    decoder, encoder = _autoencoders(decoder, encoder, dtype=dtype, device=device or pipe._execution_device,
                                     local_files_only=local_files_only)
    return finish(_adapter_for_pipeline(pipe, decoder, encoder))
