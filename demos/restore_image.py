"""Restore one photo: degrade it with an operator (seeded), solve the inverse problem with a guidance method over a
frozen flow model, and save a grid (measurement, restoration, original) with PSNR / SSIM / LPIPS.

    python demos/restore_image.py --model stabilityai/stable-diffusion-3.5-medium
    python demos/restore_image.py --model /path/to/sd3 --operator gaussian_blur:sigma=3 --method flowchef

The same run from the command line: flowsteer restore demos/images/astronaut.png --simulate --operator sr:factor=4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guidance import ModelNotFoundError  # noqa: E402
from tasks import allowed_size, open_model, read_image, resize_image, restore, save_grid  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="default", help="hub id or local folder (default: default)")
    parser.add_argument("--image", default=str(ROOT / "demos/images/astronaut.png"), help="the clean photo")
    parser.add_argument("--operator", default="sr:factor=4", help="degradation (flowsteer operators)")
    parser.add_argument("--method", default="flair", help="guidance method (flowsteer methods)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, help="resize the photo to SIZE x SIZE first (default: its own size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="restore_demo.png", help="where to write the grid")
    args = parser.parse_args(argv)

    print(f"loading {args.model}", flush=True)  # flushed: a slow run shows where it is at once
    try:
        model = open_model(args.model, progress=False)
    except ModelNotFoundError as error:
        sys.exit(f"error: {error}")
    photo = read_image(args.image)
    photo = resize_image(photo, allowed_size(model, args.size or photo.shape[-2], args.size or photo.shape[-1]))
    print(f"restoring {photo.shape[-2]}x{photo.shape[-1]} ({args.operator}) with {args.method}, {args.steps} steps",
          flush=True)
    result = restore(model, photo, args.operator, args.method, simulate=True, num_steps=args.steps, seed=args.seed)
    save_grid(args.out, [[result.measurement, result.restored, photo]], [["measured", args.method, "original"]])
    scores = ", ".join(f"{k.upper()} {v:.3g}" if isinstance(v, float) else f"{k.upper()} {v.split(':')[0]}"
                       for k, v in result.metrics.items() if k in ("psnr", "ssim", "lpips"))
    print(f"{args.method} on {args.operator}: {result.metrics['nfe']} NFE, {result.metrics['seconds']:.1f} s; {scores}",
          flush=True)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
