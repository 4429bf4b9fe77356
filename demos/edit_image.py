"""Edit part of a photo toward a text prompt with FlowChef, inversion-free: the white region of the mask follows
the edit prompt, the rest stays close to the photo.

    python demos/edit_image.py --model stabilityai/stable-diffusion-3.5-medium
    python demos/edit_image.py --model /path/to/flux --image my.png --mask my_mask.png --edit-prompt "..."

Without --mask, a band across the cat's eyes is edited. The command-line equivalent is
flowsteer edit demos/images/chelsea.png --mask MASK --source-prompt ... --edit-prompt ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guidance import ModelNotFoundError  # noqa: E402
from tasks import edit, load_image, resize_image  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="default", help="hub id or local folder of SD3 / Flux (default: default)")
    parser.add_argument("--image", default=str(ROOT / "demos/images/chelsea.png"))
    parser.add_argument("--mask", help="mask image, white = edit (default: a band across the eyes)")
    parser.add_argument("--source-prompt", default="a close-up photo of a cat")
    parser.add_argument("--edit-prompt", default="a close-up photo of a cat wearing sunglasses")
    parser.add_argument("--size", type=int, help="resize the photo (and mask) to SIZE x SIZE first")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="edit_demo", help="output folder (edited.png, grid.png, metrics.json)")
    args = parser.parse_args(argv)

    image = load_image(args.image)
    if args.mask:
        mask = (load_image(args.mask, channels=1) + 1) / 2
    else:
        mask = torch.zeros(1, 1, *image.shape[-2:])
        height, width = image.shape[-2:]
        mask[..., int(0.25 * height):int(0.6 * height), int(0.1 * width):int(0.9 * width)] = 1
    if args.size:
        image, mask = resize_image(image, (args.size, args.size)), resize_image(mask * 2 - 1, (args.size, args.size))
        mask = ((mask + 1) / 2).clamp(0, 1)
    try:
        result = edit(image, mask, args.source_prompt, args.edit_prompt, model=args.model, num_steps=args.steps,
                      resize=True, out=args.out, overwrite=True, progress=False)
    except (ModelNotFoundError, ValueError) as error:  # e.g. a text-free model: one line, no traceback
        sys.exit(f"error: {str(error).strip().splitlines()[0]}")
    m = result.metrics
    print(f"mean change inside the mask {m['change_inside_mask']:.3f}, outside {m['change_outside_mask']:.3f} "
          f"(autoencoder round trip {m['autoencoder_error']:.3f}); wrote {args.out}/grid.png")


if __name__ == "__main__":
    main()
