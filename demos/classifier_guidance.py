"""Classifier-guided generation: steer a frozen flow model toward a class of an image classifier.

    python demos/classifier_guidance.py                       # the default model, offline, toward blue
    python demos/classifier_guidance.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a house"
    python demos/classifier_guidance.py --model MODEL --classifier google/vit-base-patch16-224 \
        --label "tabby, tabby cat"
    python demos/classifier_guidance.py --classifier default --label hubble   # the default model's classifier

Without --classifier the demo uses ``colour_logits`` below, a differentiable toy "classifier" of the dominant
colour (red / green / blue) that needs no download. Any 'module:function' (or 'file.py:function') returning
logits works too, so from the command line:

    flowsteer generate --classifier demos/classifier_guidance.py:colour_logits --label blue --model MODEL --compare
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guidance import ModelNotFoundError  # noqa: E402
from tasks import generate, parse_options  # noqa: E402


def colour_logits(images: torch.Tensor) -> torch.Tensor:
    """Logits (B, 3) of red / green / blue: how much each channel exceeds the image's mean brightness."""
    channels = images.float().mean((2, 3))
    return 10 * (channels - channels.mean(1, keepdim=True))


colour_logits.labels = ("red", "green", "blue")  # class names, so that --label can be a name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="default", help="hub id or local folder (default: default)")
    parser.add_argument("--classifier", help="'default' (the default model's classifier), 'default:judge', a hub "
                                             "id, folder or module:function (default: the colour classifier)")
    parser.add_argument("--label", help="class index or name (default: blue for the colour classifier)")
    parser.add_argument("--prompt", help="text prompt, for text-to-image models only (default: none; the default "
                                         "model takes no text)")
    parser.add_argument("--method", default="flowchef", choices=("flowchef", "best_of_n", "dps"))
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option")
    parser.add_argument("--num", type=int, default=2, help="images to generate (default 2)")
    parser.add_argument("--steps", type=int, default=28, help="sampling steps (default 28)")
    parser.add_argument("--size", type=int, help="image side (default: the model's)")
    parser.add_argument("--out", default="classifier_demo", help="output folder")
    args = parser.parse_args(argv)

    classifier, label = (args.classifier, args.label) if args.classifier else (colour_logits, args.label or "blue")
    print(f"generating {args.num} image(s) toward {label!r} with {args.method}, {args.steps} steps (and unguided)",
          flush=True)  # flushed: a slow run shows where it is at once
    try:
        result = generate(args.prompt, model=args.model, method=args.method, classifier=classifier, label=label,
                          num=args.num, num_steps=args.steps, height=args.size, width=args.size,
                          options=parse_options(args.option), compare=True, out=args.out, overwrite=True,
                          progress=True)  # progress bars on stderr
    except (ModelNotFoundError, ValueError, OSError) as error:  # one line, no traceback
        sys.exit(f"classifier_guidance: error: {(str(error).strip().splitlines() or [type(error).__name__])[0]}")
    m = result.metrics
    before = ", ".join(f"{math.exp(s):.3f}" for s in m["unguided_scores"])
    after = ", ".join(f"{p:.3f}" for p in m["probabilities"])
    print(f"p({label}) unguided: {before}; {args.method}: {after}; wrote {args.out}/grid.png", flush=True)


if __name__ == "__main__":
    main()
