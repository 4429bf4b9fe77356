"""End-to-end jobs: the ``flowsteer`` commands, what they write, the studies behind the README's tables, random-weight
models and the default model's training.

Rooms: ``commands/`` (one module per command, and ``cli.py``), ``outputs/`` (image I/O, grids, plots, metrics,
result folders), ``studies/`` (``python -m tasks.studies.<name>``), ``random_models/`` (one builder file per backbone
family) and ``default_model/`` (training and evaluation of the embedded default model).

Every command is a function here: ``tasks.restore(model, image, "sr:factor=4", "flair")``, ``tasks.generate``,
``tasks.edit``, ``tasks.design``, ``tasks.benchmark`` (``run_benchmark``), ``tasks.calibrate``
(``calibrate_folder``), ``tasks.speed`` (``run_speed``) and ``tasks.memory`` (the planner,
:func:`guidance.memory_estimate.plan`). They and the helpers below load on first use, so
``import tasks`` (and the ``flowsteer`` console entry, :mod:`tasks.commands.cli`) imports neither torch nor
diffusers: Ctrl-C during start-up is met by the command line's own handling.
"""

from importlib import import_module

#: command -> (its module, the function ``tasks.<command>`` is)
COMMANDS = {
    "restore": ("tasks.commands.restore", "restore"),
    "generate": ("tasks.commands.generate", "generate"),
    "edit": ("tasks.commands.edit", "edit"),
    "design": ("tasks.commands.design", "design"),
    "benchmark": ("tasks.commands.benchmark", "run_benchmark"),
    "calibrate": ("tasks.commands.calibrate", "calibrate_folder"),
    "speed": ("tasks.commands.speed", "run_speed"),
    "memory": ("guidance.memory_estimate", "plan"),
}

#: every name imported on first use: the commands and the helpers the demos use
_LAZY = {
    **COMMANDS,
    **{name: ("tasks.outputs.image_io", name) for name in ("load_image", "save_image", "to_pil", "write_atomic")},
    "save_grid": ("tasks.outputs.grid", "save_grid"),
    "image_grid": ("tasks.outputs.grid", "image_grid"),
    "open_model": ("tasks.commands.restore", "open_model"),
    "read_image": ("tasks.commands.restore", "read_image"),
    "resize_image": ("tasks.commands.restore", "resize_image"),
    "allowed_size": ("tasks.commands.restore", "allowed_size"),
    "parse_options": ("tasks.commands.restore", "parse_options"),
    "decode_sequences": ("tasks.commands.design", "decode"),
    "TINY_PIPELINES": ("tasks.random_models", "TINY_PIPELINES"),
    "tiny_pipeline": ("tasks.random_models", "tiny_pipeline"),
}

__all__ = ["COMMANDS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
