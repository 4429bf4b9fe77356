"""Benchmark guidance methods on a folder of photos with tasks.benchmark: tables, grids and bar charts.

    python demos/benchmark_folder.py                                  # demos/images, a tiny random model, offline
    python demos/benchmark_folder.py --model stabilityai/stable-diffusion-3.5-medium --out results/sd35

With the default ``--model tiny`` nothing is downloaded: a tiny, randomly initialised SD3 pipeline is built from
config (the test suite's builders), so the restorations are poor (random weights) but every step and file is the
real one. Rerunning the same command resumes; open ``OUT/summary.md``, ``OUT/grids/`` and ``OUT/plots/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import benchmark  # noqa: E402


def tiny_model(folder: Path) -> Path:
    """Save the tiny random SD3 pipeline of the tests into ``folder`` (a real ``--model FOLDER``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import sd3_pipeline

    sd3_pipeline().save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--images", default=str(ROOT / "demos" / "images"), help="folder of clean images")
    parser.add_argument("--model", default="tiny", help="'tiny' (offline, random weights), a hub id or a folder")
    parser.add_argument("--out", default="benchmark_results", help="output folder (rerun to resume)")
    parser.add_argument("--operators", default="sr:factor=4;gaussian_blur:sigma=2", help="specs separated by ';'")
    parser.add_argument("--methods", default="pseudo_inverse,flowchef,flair", help="comma-separated methods")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 4 with tiny, else 28)")
    parser.add_argument("--size", type=int, help="image side (default: 64 with tiny, else the model's)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--overwrite", action="store_true", help="recompute everything in --out")
    args = parser.parse_args()

    tiny = args.model == "tiny"
    model = args.model
    if tiny:  # kept in OUT/.tiny_sd3 (its weights are seeded), so that a rerun has the same settings and resumes
        model = Path(args.out) / ".tiny_sd3"
        if not (model / "model_index.json").is_file():
            tiny_model(model)
    print(f"benchmarking into {args.out}: one line per finished item on stderr", flush=True)
    try:
        result = benchmark(args.images, args.operators, args.methods, model=model, out=args.out,
                           num_steps=args.steps or (4 if tiny else 28), size=args.size or (64 if tiny else None),
                           limit=args.limit, overwrite=args.overwrite)
    except ValueError as error:
        sys.exit(f"benchmark_folder: error: {error}")
    print((result.out / "summary.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
