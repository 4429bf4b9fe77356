"""Output folders for the commands: writable, never overwriting results (or inputs) unless asked."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["prepare_output_dir"]


def prepare_output_dir(out: str | os.PathLike, names: Iterable[str], overwrite: bool = False,
                       inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Create ``out`` when needed and check that it can be written, that none of ``names`` exists in it (unless
    ``overwrite``) and that no output would replace one of ``inputs``. Raises a ValueError saying what to do."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write to the output folder {str(out)!r} ({error.strerror or error}); choose "
                         f"another --out") from None
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
