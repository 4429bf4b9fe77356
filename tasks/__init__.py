"""End-to-end jobs (restore, generate, edit, benchmark, calibrate, design, speed), metrics, image I/O and the CLI.

Every command is a function here too: ``tasks.restore(model, image, "sr:factor=4", "flair")`` is
``tasks.restore.restore(...)``; ``tasks.generate``, ``tasks.edit``, ``tasks.design``, ``tasks.benchmark``
(``run_benchmark``), ``tasks.calibrate`` (``calibrate_folder``) and ``tasks.speed`` (``run_speed``) likewise. The
command modules load on first use, and so do the image helpers (``tasks.load_image`` and the rest, from
:mod:`tasks.image_io`), so ``import tasks`` (and the ``flowsteer`` console entry, :mod:`tasks.cli`) imports neither
torch nor diffusers: Ctrl-C during start-up is met by the command line's own handling.
"""

import sys
import types
from importlib import import_module

#: image helpers, loaded from :mod:`tasks.image_io` on first use
IMAGE_IO = ("load_image", "save_image", "to_pil", "write_atomic")

#: command module -> the function that calling the module runs
COMMANDS = {"restore": "restore", "generate": "generate", "edit": "edit", "design": "design",
            "benchmark": "run_benchmark", "calibrate": "calibrate_folder", "speed": "run_speed"}

__all__ = ["COMMANDS", *IMAGE_IO, *COMMANDS]


class CommandModule(types.ModuleType):
    """A command's module that is also its function: calling it calls ``COMMANDS[name]`` with the same arguments
    (attributes, submodule imports and ``from tasks.restore import ...`` work as for any module)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, COMMANDS[self.__name__.rpartition(".")[2]])(*args, **kwargs)


def callable_command(name: str) -> None:
    """Make the command module ``name`` (a module's ``__name__``) callable; each command module calls this last."""
    sys.modules[name].__class__ = CommandModule


def __getattr__(name: str):
    if name in COMMANDS:
        return import_module(f"{__name__}.{name}")
    if name in IMAGE_IO:
        return getattr(import_module(f"{__name__}.image_io"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
