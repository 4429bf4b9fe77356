"""``flowsteer speed``: its arguments, and the run that prints the table."""

from __future__ import annotations

import argparse

from ..memory_option import add_memory_argument
from .backbones import BACKBONES
from .cells import METHODS
from .report import markdown
from .run import run_speed


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _integers(value: str, option: str) -> list[int]:
    try:
        return [int(part) for part in _names(value)]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, e.g. {option} 512,1024; got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table and where it went."""
    from ..benchmark import parse_method_options

    results = run_speed(
        _names(args.backbones) if args.backbones else None, _names(args.methods) if args.methods else None,
        _integers(args.sizes, "--sizes"), _integers(args.steps, "--steps"), decoder=args.decoder,
        device=args.device, dtype=args.dtype, compile=args.compile, vae_tiling=args.vae_tiling,
        batch_size=args.batch_size, repeats=args.repeats, seed=args.seed, out=args.out, overwrite=args.overwrite,
        progress=not args.quiet, options=parse_method_options(args.option), isolate=not args.same_process,
        compile_backend=args.compile_backend, time_budget=args.time_budget, memory=args.memory)
    print(markdown(results))
    print(f"wrote table.md and results.json to {args.out}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "speed", help="time and memory of every guidance method against unguided sampling (table + JSON)",
        description="Measure wall time per image, peak memory and NFE of every method beside unguided sampling "
                    "with the same backbone, size and steps, in one run, and write table.md and results.json. "
                    "Full-size SD3.5-medium / FLUX.1-dev architectures (random weights) need a CUDA GPU.")
    parser.add_argument("--backbones", metavar="NAMES",
                        help=f"comma-separated, from {', '.join(BACKBONES)} (default: all; full-size ones need a GPU)")
    parser.add_argument("--methods", metavar="NAMES",
                        help=f"comma-separated, from {', '.join(METHODS)} (default: all; unguided is always run)")
    parser.add_argument("--sizes", default="512,768,1024", metavar="N,N", help="image sides (default 512,768,1024)")
    parser.add_argument("--steps", default="10,20", metavar="N,N", help="step counts (default 10,20)")
    parser.add_argument("--decoder", choices=("tiny", "full"), default="tiny",
                        help="decoder of the pixel losses and the final decode (default tiny)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="backbone dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--compile", nargs="?", const="regional", default="off", choices=("off", "regional", "full"),
                        help="torch.compile the transformer: regional (each repeated block; the default of a bare "
                             "--compile) or full")
    parser.add_argument("--compile-backend", metavar="NAME",
                        help="torch.compile backend (default inductor; eager checks the compiled path quickly)")
    parser.add_argument("--vae-tiling", action="store_true", help="encode and decode on tiles")
    add_memory_argument(parser)
    parser.add_argument("--option", action="append", metavar="ROW.KEY=VALUE",
                        help="a method option for one row, e.g. --option flair.data_steps=5 (repeatable)")
    parser.add_argument("--same-process", action="store_true",
                        help="on the CPU, measure every cell in this process (default: a fresh process per cell, "
                             "so that each cell's peak memory is its own)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start a cell only if its estimated seconds (rescaled by what the run measured so far) "
                             "fit in what is left of these; the others stay unmeasured (results so far are written "
                             "after every row)")
    parser.add_argument("--batch-size", type=int, default=1, help="images (seeds) per call (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell after a warm-up (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for table.md and results.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier table.md / results.json")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=run)
