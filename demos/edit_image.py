"""Edit a photo. On a text-to-image model, FlowEdit turns the band across the cat's eyes toward the edit prompt
(the rest stays the photo); on the default model, which takes no text, the photo is inverted and the band is
regenerated toward a class of the model's classifier (the --label option, "texture" by default).

    python demos/edit_image.py                                           # the default model, 64x64
    python demos/edit_image.py --model stabilityai/stable-diffusion-3.5-medium --size 1024
    python demos/edit_image.py --model /path/to/flux --image my.png --mask my_mask.png --edit-prompt "..."

Without --mask, a band across the eyes is edited. The command-line equivalents are
flowsteer edit demos/images/chelsea.png --mask MASK --source-prompt ... --edit-prompt ... and
flowsteer edit demos/images/chelsea.png --mask MASK --classifier default --label texture
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
    parser.add_argument("--model", default="default", help="hub id or local folder (default: default)")
    parser.add_argument("--image", default=str(ROOT / "demos/images/chelsea.png"))
    parser.add_argument("--mask", help="mask image, white = edit (default: a band across the eyes)")
    parser.add_argument("--method", help="the editor (default: flowedit with text, inversion_edit without)")
    parser.add_argument("--source-prompt", default="a close-up photo of a cat")
    parser.add_argument("--edit-prompt", default="a close-up photo of a cat wearing sunglasses")
    parser.add_argument("--label", default="texture", help="the class to edit toward on a model without text")
    parser.add_argument("--size", type=int, default=64, help="resize the photo (and mask) to SIZE x SIZE first")
    parser.add_argument("--steps", type=int, help="steps (default: the editor's own)")
    parser.add_argument("--out", default="edit_demo", help="output folder (edited.png, grid.png, metrics.json)")
    args = parser.parse_args(argv)

    image = load_image(args.image)
    if args.mask:
        mask = (load_image(args.mask, channels=1) + 1) / 2
    else:
        mask = torch.zeros(1, 1, *image.shape[-2:])
        height, width = image.shape[-2:]
        mask[..., int(0.25 * height):int(0.6 * height), int(0.1 * width):int(0.9 * width)] = 1
    image, mask = resize_image(image, (args.size, args.size)), resize_image(mask * 2 - 1, (args.size, args.size))
    mask = ((mask + 1) / 2).clamp(0, 1)
    try:
        from guidance import load_model

        model = load_model(args.model)
        if getattr(model, "takes_text", False):
            texts = dict(source_prompt=args.source_prompt, edit_prompt=args.edit_prompt)
        else:
            texts = dict(classifier="default", label=args.label)
        result = edit(image, mask, model=model, method=args.method, num_steps=args.steps, resize=True,
                      out=args.out, overwrite=True, progress=False, **texts)
    except (ModelNotFoundError, ValueError) as error:  # one line, no traceback
        sys.exit(f"error: {str(error).strip().splitlines()[0]}")
    m = result.metrics
    score = f", classifier log p {m['score_source']:.2f} -> {m['score_edited']:.2f}" if "score_edited" in m else ""
    print(f"{result.settings['method']}: mean change inside the mask {m['change_inside_mask']:.3f}, outside "
          f"{m['change_outside_mask']:.3f} (autoencoder round trip {m['autoencoder_error']:.3f}){score}; wrote "
          f"{args.out}/grid.png", flush=True)


if __name__ == "__main__":
    main()
