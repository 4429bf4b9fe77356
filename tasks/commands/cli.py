"""The ``flowsteer`` command line.

Each command lives in its own module, which defines ``add_parser(commands)`` (an argparse sub-parser whose
default ``run(args) -> exit code`` does the work). Adding a command is one module plus one line in ``COMMANDS``.
Errors are one line on stderr and a non-zero exit (the traceback only with ``--debug``); Ctrl-C stops cleanly,
and since every output is written atomically no half-written file is left behind.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from importlib import import_module

COMMANDS = (
    "tasks.commands.listings",   # operators, methods, models, presets
    "tasks.commands.design",
    "tasks.commands.restore",
    "tasks.commands.calibrate",
    "tasks.commands.benchmark",
    "tasks.commands.generate",
    "tasks.commands.edit",
    "tasks.commands.speed",
    "tasks.commands.memory",
)

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130

#: Commands that load no transformers or diffusers weights, so need not import those libraries to silence them.
NO_PRETRAINED = ("operators", "methods", "models", "design")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowsteer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowsteer",
        description="Training-free guidance and inverse problems over frozen rectified-flow image models.",
    )
    parser.add_argument("--version", action="version", version=f"flowsteer {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        import_module(module).add_parser(commands)
    return parser


def _interrupted(started: bool = True) -> int:
    """Ctrl-C: one line, exit 130; once the command ``started``, the empty --out folders it made are removed."""
    if started:
        from ..outputs.folders import remove_empty_outputs

        remove_empty_outputs()
    print("flowsteer: interrupted; finished results are kept, no partial file or result was written",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    # This module imports nothing heavy (nor does ``tasks``), so Ctrl-C while torch and diffusers load, in the
    # command modules' imports here, is met by the same one line as during a run.
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted(started=False)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    from ..outputs.folders import forget_outputs, remove_empty_outputs

    forget_outputs()
    try:
        from guidance.loading.models import quiet_loading

        with quiet_loading(args.command not in NO_PRETRAINED):
            return args.run(args)
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0
    except Exception as error:  # one line for the user; the traceback with --debug
        remove_empty_outputs()  # no empty --out folder is left behind
        if args.debug:
            raise
        hint = "" if isinstance(error, ValueError) else " (run with --debug for the traceback)"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"flowsteer: error: {message}{hint}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ValueError) else EXIT_FAILURE


def format_default(value) -> str:
    return "required" if value is inspect.Parameter.empty else repr(value)


def print_json(rows) -> None:
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
