"""flowsteer's embedded default model: a small latent rectified-flow prior shipped with the package.

    model = guidance.load_model("default")          # what `flowsteer restore ... --model default` uses

The folder ``guidance/default_model`` is an ordinary diffusers-format folder (``model_index.json``, ``vae/``,
``unet/``, ``scheduler/``, all weights in safetensors) loaded through the same generic adapter as users' own
text-free models; it also holds FLAIR's calibration table (``calibration/``), two image classifiers
(``classifier/`` to guide with, ``judge/`` to evaluate with), the model card and ``manifest.json`` with the
SHA-256 of every weight file, checked on load so a damaged file is named rather than silently used. It was
trained by ``python -m tasks.default_model.train`` (see the model card).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..loading.manifest import MANIFEST, DamagedModelError, verify_manifest, write_manifest

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
#: Files that must be present for load_model("default").
REQUIRED = ("model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", MANIFEST)

__all__ = ["DEFAULT_MODEL_DIR", "DefaultModelError", "check_default_model", "default_model_dir", "write_manifest"]


class DefaultModelError(DamagedModelError):
    """The default model's files are missing or damaged; the message says how to restore them."""


def default_model_dir() -> Path:
    """The folder of the default model: ``$FLOWSTEER_DEFAULT_MODEL`` when set, else the installed one."""
    override = os.environ.get("FLOWSTEER_DEFAULT_MODEL")
    return Path(override).expanduser() if override else DEFAULT_MODEL_DIR


def _restore_hint(folder: Path) -> str:
    return (f"Reinstall flowsteer (`pip install --force-reinstall flowsteer`, or `git checkout -- {folder}` in a "
            f"source checkout) or retrain it with `python -m tasks.default_model.train --out {folder}`.")


def check_default_model(folder: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """The default model's folder after checking that every required file is there and (``verify``) every weight
    file matches its recorded SHA-256; a :class:`DefaultModelError` naming the file and the fix otherwise."""
    folder = Path(folder) if folder is not None else default_model_dir()
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise DefaultModelError(f"the default model at {folder} is incomplete: missing {', '.join(missing)}. "
                                + _restore_hint(folder))
    if verify:
        try:
            verify_manifest(folder)
        except DamagedModelError as error:
            raise DefaultModelError(f"the default model: {error}. " + _restore_hint(folder)) from None
    return folder
