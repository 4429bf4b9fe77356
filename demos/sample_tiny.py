"""Load a flow model with load_model and sample from it, fully offline.

A real run is three lines::

    model = load_model("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16, device="cuda")
    cond = model.condition("a photo of a red fox in the snow", guidance_scale=4.5)
    image = sample(model, cond, num_steps=28, height=1024, width=1024, generator=torch.Generator().manual_seed(0)).image

This demo needs no download: it builds a tiny, randomly initialised pipeline of a family from config (SD3 by
default; ``--family qwen_image``, ``flux2-klein``, ``sana``, ... any of ``tasks.TINY_PIPELINES``),
saves it to a temporary folder, loads it back with ``load_model`` (which recognises the family from the folder's
model_index.json) and samples. The picture is noise (random weights); the shapes, the schedule and the code path
are the real ones.

    python demos/sample_tiny.py [--family sd3] [--out tiny_sample.png] [--steps 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guidance import load_model, sample  # noqa: E402
from tasks import TINY_PIPELINES, save_image, tiny_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--family", default="sd3", choices=list(TINY_PIPELINES), help="which family's tiny pipeline")
    parser.add_argument("--out", default="tiny_sample.png", help="where to write the PNG")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of the family's)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        tiny_pipeline(args.family).save_pretrained(folder)  # stands in for `hf download ... --local-dir folder`
        model = load_model(folder, local_files_only=True)
        print(f"loaded {type(model).__name__}: latents {model.latent_shape(args.size, args.size)} "
              f"for {args.size}x{args.size} images, sizes in multiples of {model.size_multiple}", flush=True)
        cond = model.condition("a photo of a red fox in the snow")  # the family's own guidance default
        print(f"sigmas: {[round(s, 4) for s in model.sigmas(args.steps, args.size, args.size).tolist()]}", flush=True)

        def report(info: dict) -> None:
            print(f"  step {info['step']}: sigma={float(info['sigma']):.4f} |x0_hat|={info['x0_hat'].abs().mean():.3f}",
                  flush=True)

        result = sample(model, cond, num_steps=args.steps, height=args.size, width=args.size,
                        generator=torch.Generator().manual_seed(args.seed), callback=report, progress=False)
    print(f"latent {tuple(result.x.shape)}, image {tuple(result.image.shape)} "
          f"in [{result.image.min():.2f}, {result.image.max():.2f}]", flush=True)
    save_image(result.image[:1], args.out)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
