"""``flowsteer benchmark``: its arguments, and the run that prints the summary table."""

from __future__ import annotations

from ..generate import add_size_argument, parse_size
from .run import parse_method_options, run_benchmark, split_methods, split_operators


def square_side(values: list[int] | None) -> int | None:
    """The side of --size (``N``, or ``H W`` with H = W): the benchmark restores centre-cropped squares."""
    size = parse_size(values)
    if size is None:
        return None
    if size[0] != size[1]:
        raise ValueError(f"the benchmark centre-crops every image to a square: give --size one side (--size "
                         f"{max(size)}), not {size[0]} {size[1]}")
    return size[0]


def run(args) -> int:
    """Run the benchmark and print the summary table."""
    from ..restore import cli_messages

    size = square_side(args.size)
    with cli_messages():
        result = run_benchmark(
            args.images, split_operators(args.operators), split_methods(args.methods), out=args.out,
            model=args.model, num_steps=args.steps, seed=args.seed, size=size, limit=args.limit,
            options=parse_method_options(args.option), overwrite=args.overwrite, device=args.device,
            dtype=args.dtype, progress=not args.quiet, samples=args.samples,
            consistency_steps=args.consistency_steps, preset=args.preset, prompt=args.prompt,
            negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, captions=args.captions,
            noise_std=args.noise_std, decoder=args.decoder, encoder=args.encoder, official_quirks=args.official_quirks,
            memory=args.memory)
    done = f"{result.computed} item(s) computed, {result.skipped} already done"
    if result.summary is None:
        print(f"process {result.rank} of {result.world_size}: {done}; process 0 writes the summary")
        return 0
    print((result.out / "summary.md").read_text().split("\n\n")[2])
    print(f"{done}; wrote summary.md, summary.csv, summary.json, items.csv, grids/ and plots/ to {result.out}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "benchmark", help="benchmark guidance methods on a folder of images (tables, grids, plots)",
        description="Restore every image of a folder with every operator and method (from measurements simulated "
                    "with a per-image seed), score PSNR, SSIM and LPIPS, and write summary tables, grids and bar "
                    "charts into --out. Rerunning resumes; RANK / WORLD_SIZE (accelerate launch, torchrun) shard "
                    "the items over processes.")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of clean images (PNG, JPEG, ...)")
    parser.add_argument("--preset", metavar="NAME",
                        help="a published setting (flowsteer presets lists them, e.g. flair_sr12): it sets the "
                             "method and its options, steps, operators, noise, model, decoder, size, prompt, "
                             "guidance scale and seed; any of those given here overrides it and is recorded")
    parser.add_argument("--official-quirks", action="store_true",
                        help="with --preset: reproduce what the official code does that flowsteer deliberately does "
                             "not (the preset's quirks: off-centre kernels, re-sampled noise, ...), for parity runs")
    parser.add_argument("--operators", action="append", metavar="SPECS",
                        help="operator specs separated by ';', e.g. 'sr:factor=4;gaussian_blur:sigma=3' (repeatable; "
                             "required without --preset)")
    parser.add_argument("--methods", action="append", metavar="NAMES",
                        help="methods separated by ',', e.g. flair,dps (repeatable; flowsteer methods; required "
                             "without --preset)")
    parser.add_argument("--model", help="hub id, local folder or 'default' (flowsteer models; default: the "
                                        "preset's, else 'default')")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the preset's, else 28)")
    parser.add_argument("--seed", type=int,
                        help="base seed; image i uses seed + 2 i (default: the preset's, else 0)")
    parser.add_argument("--prompt", help="text prompt of every image (text-conditioned models; with --captions, "
                                         "the prefix of each caption)")
    parser.add_argument("--negative-prompt", help="negative prompt (text-conditioned models)")
    parser.add_argument("--guidance-scale", type=float, metavar="W", help="classifier-free guidance scale")
    parser.add_argument("--captions", metavar="FILE",
                        help="a caption per image, one '<image file name>: <caption>' line each; the prompt of an "
                             "image is then '<prompt> <caption>'")
    parser.add_argument("--noise-std", type=float, metavar="S",
                        help="measurement noise std in [-1, 1] units for every operator (default: the operator's)")
    parser.add_argument("--decoder", metavar="ID",
                        help="an autoencoder (hub id or folder, e.g. madebyollin/taesd3) that decodes in place of "
                             "the model's VAE; 'none' keeps the VAE")
    parser.add_argument("--encoder", metavar="ID", help="the same for encoding; 'none' keeps the VAE")
    add_size_argument(parser, "the model's size, else 256; the images are centre-cropped to squares and resized, "
                              "so H W needs H = W")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images (sorted by name)")
    parser.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                        help="a method option, e.g. --option flowchef.step_size=0.3 (repeatable)")
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="the mean of K seeds per item (posterior-mean estimate; default 1)")
    parser.add_argument("--consistency-steps", type=int, metavar="N",
                        help="at most N pixel-space Landweber iterations toward A(x) = y per item, stopped at the "
                             "noise level (default: the model's recommendation, else 0)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="skip the items already done (the default; settings must match the earlier run)")
    again.add_argument("--overwrite", action="store_true",
                       help="recompute every item, replacing an earlier benchmark in --out (even with other settings)")
    parser.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    from ..memory_option import add_memory_argument

    add_memory_argument(parser)
    parser.set_defaults(run=run)
