"""Atomic file writes: every file flowsteer writes appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_text_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(temporary_path)`` on a temporary file in the target folder, then rename it onto ``path``:
    readers never see a partial file, and nothing is left behind when ``write`` fails (or is interrupted)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(handle)
    except OSError as error:
        raise _named(error, path) from None
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):  # e.g. a full disk: name the file, not the hidden temporary one
            raise _named(error, path) from None
        raise
    return path


def _named(error: OSError, path: Path) -> OSError:
    """The same kind of OSError, saying which output could not be written and why."""
    reason = error.strerror or str(error)
    return type(error)(error.errno, f"could not write {path}: {reason}; nothing was written there")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda temporary: Path(temporary).write_text(text))
