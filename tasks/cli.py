"""The ``flowsteer`` command line."""

from __future__ import annotations

import argparse
import inspect
import json
import sys


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowsteer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _format_default(value) -> str:
    return "required" if value is inspect.Parameter.empty else repr(value)


def cmd_operators(args: argparse.Namespace) -> int:
    """List the registered forward operators with their parameters and defaults."""
    from operators import list_operators

    rows = []
    for entry in list_operators():
        rows.append({
            "name": entry.name,
            "summary": entry.summary,
            "linear": "yes" if entry.cls.is_linear else ("per instance" if hasattr(entry.cls, "adjoint") else "no"),
            "parameters": {k: _format_default(v) for k, v in entry.parameters().items()},
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  (linear: {row['linear']})  {row['summary']}")
        print("    " + ", ".join(f"{k}={v}" for k, v in row["parameters"].items()))
    print(f"\n{len(rows)} operators. Build one with a spec such as 'sr:factor=4,noise_std=0.01' or "
          f"'gaussian_blur:sigma=2 | sr:factor=2'.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowsteer",
        description="Training-free guidance and inverse problems over frozen rectified-flow image models.",
    )
    parser.add_argument("--version", action="version", version=f"flowsteer {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("operators", help="list the forward operators and their parameters")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(run=cmd_operators)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ValueError as error:
        print(f"flowsteer: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
