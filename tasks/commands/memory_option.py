"""The ``--memory PROFILE`` option of every command that loads a model, and the check before it loads."""

from __future__ import annotations

import os

__all__ = ["add_memory_argument", "preload_profile"]


def add_memory_argument(parser) -> None:
    """``--memory PROFILE`` of the commands that load a model."""
    from guidance.memory_profiles import PROFILES

    parser.add_argument("--memory", metavar="PROFILE",
                        help=f"memory profile: {', '.join(PROFILES)} (lightest first), or auto (the lightest whose "
                             f"estimate fits the device's free memory); flowsteer memory --help describes them "
                             f"(default: none)")


def preload_profile(model, memory: str | None, method: str, size: tuple[int, int] | None, batch: int, device, dtype,
                    what: str, options: dict | None = None, space: str = "pixel") -> str | None:
    """The memory profile a command loads ``model`` with, checked before it loads: a run that the planner says does
    not fit the device's free memory with ``memory`` (None: no profile) is refused in one line naming the profile
    that fits; "auto" becomes the lightest that fits (:func:`guidance.memory.check_plan`). ``size`` None: the
    family's size. Sources the planner cannot read (and loaded models) keep ``memory`` as given."""
    from guidance.memory import check_plan
    from guidance.memory_profiles import AUTO, check_profile

    if memory is not None:
        memory = check_profile(memory)
    if not isinstance(model, (str, os.PathLike)):
        return memory
    height, width = size or (None, None)
    chosen = check_plan(model, method, height, width, batch, memory, device=device, dtype=dtype, what=what,
                        options=options, space=space)
    return memory if chosen is None and memory == AUTO else chosen
