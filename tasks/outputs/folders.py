"""Output folders for the commands: writable, never overwriting results (or inputs) unless asked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["check_writable", "forget_outputs", "prepare_output_dir", "remove_empty_outputs", "write_outputs"]

_created: list[Path] = []  # output folders this process made, removed again by remove_empty_outputs while empty


def prepare_output_dir(out: str | os.PathLike, names: Iterable[str], overwrite: bool = False,
                       inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Create ``out`` when needed and check that it can be written, that none of ``names`` exists in it (unless
    ``overwrite``) and that no output would replace one of ``inputs``. Raises a ValueError saying what to do."""
    out = Path(out)
    _created.extend(reversed([p for p in (out, *out.parents) if not p.exists()]))  # popped deepest first
    check_writable(out, "--out", "the output folder")
    targets = [out / name for name in names]
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for target in targets:
        if target.resolve() in resolved_inputs:
            raise ValueError(f"the output {str(target)!r} would replace an input; choose another --out")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]!r} already exists{' (and more)' if len(existing) > 1 else ''}; pass "
                         f"--overwrite to replace it or choose another --out")
    return out


def check_writable(folder: str | os.PathLike, option: str, what: str = "the folder") -> Path:
    """Create ``folder`` when needed and check that a file can be written in it, before any work; a ValueError
    naming the folder (not a hidden probe file) and the option to change otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write to {what} {str(folder)!r} ({error.strerror or error}); choose another "
                         f"{option}") from None
    return folder


def forget_outputs() -> None:
    """Start a new command: the folders made before it are no longer this run's to remove."""
    _created.clear()


def remove_empty_outputs() -> list[Path]:
    """Remove the output folders that :func:`prepare_output_dir` created and that are still empty (after an error
    or an interrupt, so that none is left behind); returns those removed."""
    removed = []
    while _created:
        folder = _created.pop()
        try:
            folder.rmdir()  # only when empty
            removed.append(folder)
        except OSError:
            pass
    return removed


def write_outputs(writes: Iterable[tuple[Path, Callable[[Path], object]]]) -> list[Path]:
    """Write a result set so that it appears whole or not at all: every ``write(path)`` writes into a hidden
    staging folder beside its destination, and only when all of them succeeded are the files moved into place (a
    rename each, in order, so the last one, metrics.json, comes last). When a write fails (a full disk, say) or is
    interrupted, nothing of the set reaches the destination and a file it would have replaced stays as it was;
    the error names the destination file. Returns the paths."""
    writes = [(Path(path), write) for path, write in writes]
    staging: dict[Path, Path] = {}  # destination folder -> its staging folder
    moved: list[Path] = []
    try:
        staged = []
        for path, write in writes:
            temporary = path
            try:
                if path.parent not in staging:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    staging[path.parent] = Path(tempfile.mkdtemp(dir=path.parent, prefix=".flowsteer-set-"))
                temporary = staging[path.parent] / path.name
                write(temporary)
            except OSError as error:  # one line naming the output, not the staging folder
                reason = error.strerror or str(error)
                inner = f"could not write {temporary}: "  # guidance.loading.files.write_atomic's own wording
                if reason.startswith(inner):
                    reason = reason[len(inner):].removesuffix("; nothing was written there")
                message = f"could not write {path}: {reason}; no file of this result set was written"
                raise (type(error)(error.errno, message) if error.errno else OSError(message)) from None
            staged.append((temporary, path))
        for temporary, path in staged:
            os.replace(temporary, path)
            moved.append(path)
    except BaseException:
        for path in moved:  # a rename failed midway (rare): take back the part of the set already in place
            path.unlink(missing_ok=True)
        raise
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
    return [path for path, _ in writes]
