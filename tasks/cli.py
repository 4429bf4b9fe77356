"""The ``flowsteer`` command line."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path


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


def _sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(bars[min(7, int((v - low) / span * 8))] for v in values)


def cmd_design(args: argparse.Namespace) -> int:
    """Guide a simplex flow toward a score with straight-through guidance; print the best sequences."""
    import torch

    from . import design as tasks_design

    alphabet = args.alphabet
    score = tasks_design.load_score(args.score, alphabet)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out!r} already exists; pass --overwrite to replace it")
    if args.train:
        from guidance.models.simplex_network import train_simplex_flow

        sequences = tasks_design.read_sequences(args.train, alphabet)
        print(f"training a simplex flow on {len(sequences)} sequences of length {sequences.shape[1]} "
              f"({args.train_steps} steps)", file=sys.stderr)
        flow, _ = train_simplex_flow(sequences, len(alphabet), steps=args.train_steps, progress=not args.quiet,
                                     generator=torch.Generator().manual_seed(args.seed))
        if args.save_flow:
            flow.save(args.save_flow)
    else:
        flow = tasks_design.load_sequence_flow(args.flow, len(alphabet))
    result = tasks_design.design(flow, score, alphabet, num_sequences=args.num, num_steps=args.steps,
                                 gamma=args.gamma, samples=args.samples, source=args.source, draw=args.draw,
                                 seed=args.seed, progress=not args.quiet)
    print(f"mean score: unguided {result.unguided_mean:.3f} -> guided {result.guided_mean:.3f} "
          f"({args.num} sequences, {result.seconds:.1f} s)")
    print(f"score of the hard samples per step: {_sparkline(result.curve)}  "
          f"{result.curve[0]:.3f} -> {result.curve[-1]:.3f}")
    for sequence, value in list(zip(result.sequences, result.scores))[: args.top]:
        print(f"{value:8.3f}  {sequence}")
    if args.out:
        tasks_design.save_result(result, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
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

    design = commands.add_parser("design", help="guide a simplex flow over sequences toward a score",
                                 description="Generate sequences with straight-through guidance toward a score "
                                             "(higher is better) and print the best ones.")
    source = design.add_mutually_exclusive_group()
    source.add_argument("--flow", default="analytic",
                        help="'analytic[:length=12,components=3,seed=0]' (a random exact prior) or a folder saved by "
                             "NetworkSimplexFlow.save (default: analytic)")
    source.add_argument("--train", metavar="FILE", help="fit a simplex flow to the sequences in FILE (one per line)")
    design.add_argument("--train-steps", type=int, default=500, help="training steps with --train (default 500)")
    design.add_argument("--save-flow", metavar="DIR", help="with --train: save the fitted flow to DIR")
    design.add_argument("--score", required=True, help="'motif:LETTERS' or 'module:function' on one-hot sequences")
    design.add_argument("--alphabet", default="ACGT", help="the vocabulary, one letter per token (default ACGT)")
    design.add_argument("--num", type=int, default=64, help="sequences to generate (default 64)")
    design.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    design.add_argument("--gamma", type=float, default=2.0, help="guidance scale (default 2.0)")
    design.add_argument("--samples", type=int, default=8, help="M, hard samples per step (default 8)")
    design.add_argument("--source", choices=("endpoint", "state"), default="endpoint",
                        help="draw hard samples from the predicted endpoint or the current state (default endpoint)")
    design.add_argument("--draw", choices=("sample", "argmax"), default="sample", help="categorical draws or argmax")
    design.add_argument("--seed", type=int, default=0)
    design.add_argument("--top", type=int, default=10, help="how many of the best sequences to print (default 10)")
    design.add_argument("--out", help="also write all sequences, scores and the score curve to this JSON file")
    design.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    design.add_argument("--quiet", action="store_true", help="no progress bars")
    design.set_defaults(run=cmd_design)
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
