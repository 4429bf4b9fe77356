"""Where a model comes from: a local folder's or hub repository's ``model_index.json``, the family it names, and
the one message for a model that is not on this machine. Read by :mod:`guidance.loading.models` (which loads) and
by :mod:`guidance.memory_estimate` (which plans from the configs without loading)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .manifest import DamagedModelError
from ..backbones.registry import family_for_index, refusal, supported_pipelines

__all__ = ["ModelNotFoundError", "classify_index", "hub_errors", "hub_offline", "not_found", "read_index"]


class ModelNotFoundError(OSError, ValueError):
    """The requested weights are not on this machine (or not reachable); the message says how to get them."""


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be reached (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def not_found(name: str, error: BaseException | None, offline: bool) -> ModelNotFoundError:
    reason = ""
    if error is not None and not isinstance(error, FileNotFoundError):  # e.g. 404, gated, invalid id
        first = str(error).strip().splitlines()
        reason = f" ({type(error).__name__}: {first[0] if first else ''})"
    where = "in the local Hugging Face cache (offline mode)" if offline else "locally or on the Hugging Face hub"
    extra = ""
    if type(error).__name__ == "GatedRepoError":
        extra = " The repository is gated: accept its licence on the hub and log in with `hf auth login` first."
    return ModelNotFoundError(
        f"could not load {name!r}: it was not found {where}{reason}.{extra} Download it with "
        f"`hf download {name}` (or `huggingface-cli download {name}`) on a machine with network access, "
        f"or pass the path of a local folder holding the model (written by save_pretrained)."
    )


def hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HFValidationError

        errors.append(HFValidationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def classify_index(index: dict) -> tuple[str, str | None]:
    """(backbone family, pipeline class that loads it) of a folder's index (a name in
    :data:`~guidance.backbones.registry.BACKBONES`; no pipeline class for generic folders)."""
    found = family_for_index(index)
    if found is not None:
        return found[0].name, found[1]
    name = str(index.get("_class_name", ""))
    refused = refusal(name)
    if refused:
        raise ValueError(refused)
    has_text = any(key.startswith("text_encoder") for key in index)
    if not has_text and ("unet" in index or "transformer" in index):
        return "generic", None
    raise ValueError(
        f"unsupported pipeline {name or '(no _class_name)'!r}: flowsteer loads the pipelines "
        f"{', '.join(supported_pipelines())}, or text-free folders with a 'unet' or 'transformer' (plus optional "
        "'vae' and 'scheduler'); wrap other networks with GenericFlowModel"
    )


def read_index(source: str, local_files_only: bool) -> dict:
    """model_index.json of a local folder or hub repository."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / "model_index.json"
        if not file.is_file():
            raise ValueError(
                f"{str(path)!r} has no model_index.json; it is not a diffusers pipeline folder (save one with "
                "pipeline.save_pretrained(folder), or wrap a single network with GenericFlowModel)"
            )
        try:
            index = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise DamagedModelError(f"the model folder {path} is damaged: model_index.json is not valid JSON "
                                    f"({error})") from None
        if not isinstance(index, dict):
            raise DamagedModelError(f"the model folder {path} is damaged: model_index.json holds "
                                    f"{type(index).__name__}, not an object")
        return index
    from huggingface_hub import hf_hub_download

    offline = local_files_only or hub_offline()
    try:
        file = hf_hub_download(repo_id=source, filename="model_index.json", local_files_only=offline)
    except hub_errors() as error:
        raise not_found(source, error, offline) from None
    return json.loads(Path(file).read_text())
