"""Weight manifests: ``manifest.json`` in a model folder records the SHA-256 of every ``*.safetensors`` file under
it, so that a damaged or swapped weight file is named on load instead of silently used. Any local folder that has
one is verified by :func:`guidance.load_model`."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path, PureWindowsPath

__all__ = ["MANIFEST", "DamagedModelError", "sha256", "verify_manifest", "write_manifest"]

MANIFEST = "manifest.json"


class DamagedModelError(OSError, ValueError):
    """A local model folder is damaged (a weight file missing or not matching its manifest, a broken config); the
    message names the folder and the file."""


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the SHA-256 of every ``*.safetensors`` file under ``folder`` in ``manifest.json``."""
    folder = Path(folder)
    files = {str(path.relative_to(folder)).replace(os.sep, "/"): sha256(path)
             for path in sorted(folder.rglob("*.safetensors"))}
    path = folder / MANIFEST
    path.write_text(json.dumps({"sha256": files}, indent=1) + "\n")
    return path


def _inside(folder: Path, name) -> str:
    """A manifest entry as a relative path inside ``folder``; an absolute path, a drive or a ``..`` that leaves the
    folder is refused (a manifest never makes flowsteer read a file outside its model folder)."""
    text = name.replace("\\", "/") if isinstance(name, str) else ""
    normal = posixpath.normpath(text) if text else ""
    if not text or text.startswith("/") or PureWindowsPath(name).drive or normal == ".." \
            or normal.startswith("../") or normal == ".":
        raise DamagedModelError(f"the model folder {folder} has a damaged {MANIFEST}: its entry {name!r} is not a "
                                f"path inside the folder (absolute, or leaving it with '..'); entries are relative "
                                f"paths such as 'unet/diffusion_pytorch_model.safetensors': restore the folder or "
                                f"remove its {MANIFEST}")
    return normal


def verify_manifest(folder: str | os.PathLike) -> bool:
    """Check every file that ``folder``'s manifest lists against its SHA-256: True when they all match, False when
    the folder has no manifest; a :class:`DamagedModelError` naming the first bad file otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())["sha256"]
        items = list(recorded.items())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedModelError(f"the model folder {folder} has a damaged {MANIFEST} ({error}); restore the "
                                f"folder or remove its {MANIFEST}") from None
    files = [folder / _inside(folder, name) for name, _ in items]  # every entry confined before any is read
    for file, (name, digest) in zip(files, items):
        if not file.is_file():
            raise DamagedModelError(f"the model folder {folder} is damaged: its weight file {name} is missing")
        if sha256(file) != digest:
            raise DamagedModelError(f"the model folder {folder} is damaged: the weight file {name} does not match "
                                    f"the SHA-256 recorded in {MANIFEST}; restore it (copy it again)")
    return True
