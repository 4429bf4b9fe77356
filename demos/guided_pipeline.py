"""Compose the library's pieces in code: a forward operator, an objective, a guidance method and a flow model.

    python demos/guided_pipeline.py --model stabilityai/stable-diffusion-3.5-medium

Deblurs a photo with FlowChef: the operator simulates the measurement y = A(x) + n, MeasurementFidelity turns it
into the loss ||A(D(x0_hat)) - y||^2, and the method steers the frozen model's sampling with its gradient.
Swap any piece: another operator ("sr:factor=4", "inpaint_box"), a ClassifierObjective or RewardObjective,
another method ("flair", "dps", ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guidance import MeasurementFidelity, ModelNotFoundError, get_method, load_model  # noqa: E402
from operators import make_operator  # noqa: E402
from tasks import load_image, resize_image, save_grid  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="default", help="hub id or local folder (default: default)")
    parser.add_argument("--image", default=str(ROOT / "demos/images/coffee.png"))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--out", default="guided_pipeline.png", help="where to write the grid")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"loading {args.model} on {device}", flush=True)  # flushed: a slow run shows where it is at once
    try:
        model = load_model(args.model, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    except ModelNotFoundError as error:
        sys.exit(f"error: {error}")

    clean = resize_image(load_image(args.image), (args.size, args.size)).to(model.device)  # (1, 3, H, W), [-1, 1]
    operator = make_operator("gaussian_blur:sigma=3,noise_std=0.01").to(model.device)   # the forward model A
    y = operator.measure(clean, torch.Generator().manual_seed(0))                       # y = A(x) + n
    objective = MeasurementFidelity(operator, y)                                        # ||A(D(x0_hat)) - y||^2
    method = get_method("flowchef", step_size=0.5, inner_steps=1)                       # gradient skipping
    print(f"deblurring {args.size}x{args.size} with flowchef, {args.steps} steps", flush=True)
    result = method(model, objective, num_steps=args.steps, height=args.size, width=args.size,
                    generator=torch.Generator().manual_seed(0))                          # a progress bar on stderr

    save_grid(args.out, [[y, result.image.clamp(-1, 1), clean]], [["blurred", "flowchef", "clean"]])
    with torch.no_grad():
        loss = float(objective(model, result.x)[0])
    print(f"flowchef: {result.nfe} NFE, final loss {loss:.4g}; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
