"""Classifier- and reward-guided generation over a frozen flow model.

    flowsteer generate --prompt "a photo of a fox" --reward "clip:a red fox in the snow" --model MODEL
    flowsteer generate --classifier google/vit-base-patch16-224 --label "tabby, tabby cat" --model MODEL \\
        --method best_of_n --option candidates=8 --num 4 --compare

From code, with a model source or an already-loaded FlowModel::

    result = generate("a photo of a fox", model=model, reward="clip:a red fox", num=2, out="results/fox")
    result.images, result.scores, result.metrics     # images: PIL (output_type="pil"), result.image: the tensor

Each image i starts from the noise of seed ``seed + i`` (``--compare`` also samples it unguided from the same
noise). Scores are the reward, or log p(label) for a classifier; higher is better.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guidance import get_method
from guidance.features.rewards import BUNDLED_CLASSIFIERS, DEFAULT_CLIP, classifier_source, make_guide  # noqa: F401
from guidance.loading.devices import check_device
from guidance.loading.files import write_text_atomic
from guidance.loading.images import ImageOutput, check_output_type
from guidance.memory import check_memory
from operators.checks import MAX_BATCH, MAX_STEPS, check_int, check_seed, check_work

from ..outputs.folders import prepare_output_dir, write_outputs
from ..outputs.grid import save_grid
from ..outputs.image_io import save_image

__all__ = ["BUNDLED_CLASSIFIERS", "METHODS", "Generation", "add_size_argument", "classifier_source", "generate",
           "parse_size"]

METHODS = ("flowchef", "best_of_n", "particles", "dps", "unguided")

@dataclass
class Generation(ImageOutput):
    """The generated ``samples`` (each (1, 3, H, W) in [-1, 1]) with their ``scores``; with ``compare``, the
    ``unguided`` images from the same noise and their scores; ``metrics`` and every ``settings`` value used.
    ``image`` is the samples as one (num, 3, H, W) batch and ``images`` as diffusers returns them (``output_type``:
    "pil", "np" or "pt")."""

    samples: list[torch.Tensor]
    scores: list[float]
    unguided: list[torch.Tensor] = field(default_factory=list)
    unguided_scores: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    output_type: str = "pil"

    @property
    def image(self) -> torch.Tensor:
        return torch.cat(self.samples)


def add_size_argument(parser, default: str) -> None:
    """``--size``, as ``generate``, ``benchmark`` and ``calibrate`` take it: one number for a square or two for
    height and width (read with :func:`parse_size`); ``default`` says what no --size means."""
    parser.add_argument("--size", type=int, nargs="+", metavar=("N", "W"),
                        help=f"image size: N for N x N, or H W for height x width (default: {default})")


def parse_size(values: list[int] | None) -> tuple[int, int] | None:
    """``--size N`` -> (N, N), ``--size H W`` -> (H, W), no --size -> None."""
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise ValueError(f"--size takes one number (a square: --size 512) or two (height and width: --size 512 "
                         f"768), got {len(values)}: {' '.join(map(str, values))}")
    return values[0], values[-1]


def output_names(num: int, compare: bool) -> list[str]:
    names = [f"sample_{i}.png" for i in range(num)] + ["grid.png", "metrics.json"]
    return names + ([f"unguided_{i}.png" for i in range(num)] if compare else [])


def generate(prompt: str | None = None, *, model: Any = "default", method: str = "flowchef",
             reward: str | Callable | None = None, classifier: str | Callable | None = None,
             label: int | str | None = None, clip: str = DEFAULT_CLIP, weight: float = 1.0, num: int = 1,
             num_steps: int | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
             negative_prompt: str | None = None, guidance_scale: float | None = None, options: dict | None = None,
             compare: bool = False, out: str | os.PathLike | None = None, overwrite: bool = False,
             progress: bool = True, device: str | None = None, dtype: Any = None, output_type: str = "pil",
             num_inference_steps: int | None = None, memory: str | None = None) -> Generation:
    """Generate ``num`` images guided toward a ``reward`` (``"clip:TEXT"``, ``"module:function"`` or a callable
    images -> (B,)) or toward class ``label`` (an index or a class name) of a ``classifier`` (``"default"`` or
    ``"default:judge"``, the default model's own, a transformers hub id or folder, ``"module:function"`` or a
    callable images -> logits), with ``method`` (flowchef, best_of_n, particles, dps or unguided)
    and its ``options``. ``weight`` scales the objective. With ``out``, writes sample_<i>.png, grid.png and
    metrics.json (and unguided_<i>.png with ``compare``); everything cheap is checked before the model loads.
    ``output_type`` is the form of the result's ``images``; ``num_inference_steps`` is diffusers' ``num_steps``;
    ``memory`` a memory profile (a run the planner says does not fit is refused before the model loads)."""
    from .memory_option import preload_profile
    from .restore import open_model, peak_memory, steps_argument

    check_output_type(output_type)
    num_steps = steps_argument(num_steps, num_inference_steps, 28)
    if method not in METHODS:
        raise ValueError(f"generate runs one of {', '.join(METHODS)}, not {method!r} (the other methods solve "
                         f"inverse problems: see `flowsteer restore`)")
    check_int(num, "the number of images (--num)", 1, MAX_BATCH)
    check_int(num_steps, "the number of steps (--steps)", 1, MAX_STEPS)
    check_seed(seed, "the seed (--seed)")
    for side, value in (("height", height), ("width", width)):
        if value is not None:
            check_int(value, f"the image {side} (--size, --{side})", 1, None)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"the guidance weight (--weight) must be a finite number, got {weight!r}")
    options = dict(options or {})
    solver = get_method(method, **options)  # unknown options fail before anything loads
    device = check_device(device or getattr(model, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    if out is not None:
        out = prepare_output_dir(out, output_names(num, compare), overwrite=overwrite)
    guide = make_guide(reward=reward, classifier=classifier, label=label, clip=clip, weight=weight, device=device)
    planned = (height, width) if height is not None and width is not None else None
    memory = preload_profile(model, memory, method, planned, 1, device, dtype, "generation", options)
    net = open_model(model, device=device, dtype=dtype, progress=progress, memory=memory)
    if (height is None or width is None) and net.default_size is None:
        raise ValueError(f"{type(net).__name__} has no default image size; give one with --size (N or H W)")
    height = net.default_size[0] if height is None else height
    width = net.default_size[1] if width is None else width
    net.check_size(height, width)
    check_work({"num": num, "num_steps": num_steps}, "generate")
    check_memory(net, height, width, 1, "generation", method, options)
    extra = {k: v for k, v in (("negative_prompt", negative_prompt), ("guidance_scale", guidance_scale))
             if v is not None}
    cond = net.condition(prompt, **extra) if prompt is not None or extra else None

    def run(function, noise_seed: int) -> tuple[torch.Tensor, int]:
        result = function(net, guide.objective, num_steps=num_steps, cond=cond, height=height, width=width,
                          generator=torch.Generator().manual_seed(noise_seed), progress=progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result.image.detach().clamp(-1, 1)[:1], result.nfe

    def score(image: torch.Tensor) -> float:
        with torch.no_grad():
            value = guide.score(image.to(device))
        if value.shape != (1,):
            raise ValueError(f"the {guide.kind} must return one score per image, shape (B,), got {tuple(value.shape)}")
        return float(value[0])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generation = Generation(samples=[], scores=[], output_type=output_type)
    seconds, nfe = 0.0, 0
    for i in range(num):
        begin = time.perf_counter()
        image, nfe = run(solver, seed + i)
        seconds += time.perf_counter() - begin
        generation.samples.append(image)
        generation.scores.append(score(image))
        if compare:
            baseline, _ = run(get_method("unguided"), seed + i)
            generation.unguided.append(baseline)
            generation.unguided_scores.append(score(baseline))

    from guidance.methods import method_options

    metrics: dict[str, Any] = {"score_kind": "reward" if guide.kind == "reward" else "log p(label)",
                               "mean_score": sum(generation.scores) / num, "scores": generation.scores}
    if guide.kind == "classifier":
        metrics["probabilities"] = [math.exp(s) for s in generation.scores]
    if compare:
        metrics["unguided_mean_score"] = sum(generation.unguided_scores) / num
        metrics["unguided_scores"] = generation.unguided_scores
    metrics.update({"seconds": seconds, "seconds_per_image": seconds / num, "nfe": nfe, **peak_memory(device)})
    generation.metrics = metrics
    generation.settings = {
        "prompt": prompt, "negative_prompt": negative_prompt, "guidance_scale": guidance_scale, "method": method,
        "options": {**method_options(method), **options}, **guide.settings, "num": num, "num_steps": num_steps,
        "seed": seed, "seeds": [seed + i for i in range(num)], "height": height, "width": width, "compare": compare,
        "model": str(model) if isinstance(model, (str, os.PathLike)) else
        (getattr(net, "name_or_path", None) or type(net).__name__),
        "device": str(net.device), "dtype": str(getattr(net, "dtype", "")).replace("torch.", ""),
        "out": None if out is None else str(out)}
    if out is not None:
        save_generation(generation, out)
    return generation


def save_generation(generation: Generation, out: str | os.PathLike) -> Path:
    """Write sample_<i>.png (unguided_<i>.png), grid.png (unguided row on top) and metrics.json, as one set that
    appears whole or not at all (:func:`tasks.outputs.folders.write_outputs`)."""
    out = Path(out)
    writes = [(out / f"{kind}_{i}.png", lambda path, image=image: save_image(image, path))
              for kind, images in (("sample", generation.samples), ("unguided", generation.unguided))
              for i, image in enumerate(images)]
    rows = [generation.samples]
    captions = [[f"{generation.settings['method']} {s:.3g}" for s in generation.scores]]
    if generation.unguided:
        rows.insert(0, generation.unguided)
        captions.insert(0, [f"unguided {s:.3g}" for s in generation.unguided_scores])
    metrics = json.dumps({**generation.metrics, "settings": generation.settings}, indent=2, default=str) + "\n"
    write_outputs([*writes, (out / "grid.png", lambda path: save_grid(path, rows, captions)),
                   (out / "metrics.json", lambda path: write_text_atomic(path, metrics))])
    return out


# -- `flowsteer generate` -------------------------------------------------------------------------------------
def run(args) -> int:
    """Generate and write the images."""
    from .restore import cli_messages, parse_options

    size = parse_size(args.size)
    if size and (args.height or args.width):
        raise ValueError("give the image size either as --size (N or H W) or as --height/--width, not both")
    height, width = size or (args.height, args.width)
    with cli_messages():
        result = generate(
            args.prompt, model=args.model, method=args.method, reward=args.reward, classifier=args.classifier,
            label=args.label, clip=args.clip, weight=args.weight, num=args.num, num_steps=args.steps,
            seed=args.seed, height=height, width=width, negative_prompt=args.negative_prompt,
            guidance_scale=args.guidance_scale, options=parse_options(args.option), compare=args.compare,
            out=args.out, overwrite=args.overwrite, progress=not args.quiet, device=args.device,
            dtype=args.dtype, memory=args.memory)
    m = result.metrics
    versus = f" (unguided {m['unguided_mean_score']:.4g})" if "unguided_mean_score" in m else ""
    print(f"{args.method}: mean {m['score_kind']} {m['mean_score']:.4g}{versus}; {m['nfe']} NFE, "
          f"{m['seconds_per_image']:.1f} s per image")
    print(f"wrote {len(result.samples)} image(s), grid.png and metrics.json to {result.settings['out']}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "generate", help="generate images guided by a classifier or a reward (CLIP, any Python function)",
        description="Classifier- or reward-guided generation over a frozen flow model. Writes sample_<i>.png, "
                    "grid.png and metrics.json (scores, time, NFE, settings) into --out.")
    parser.add_argument("--prompt", metavar="TEXT", help="text prompt for text-conditioned models (default: none)")
    parser.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt for CFG (default: none)")
    guide = parser.add_mutually_exclusive_group(required=True)
    guide.add_argument("--reward", metavar="SPEC",
                       help="'clip:TEXT' (CLIP similarity to TEXT) or 'module:function' (images in [-1, 1] -> "
                            "(B,) rewards, higher is better)")
    guide.add_argument("--classifier", metavar="SOURCE",
                       help="'default' or 'default:judge' (the default model's classifiers, flowsteer models "
                            "lists them), a transformers image-classification hub id or folder, or "
                            "'module:function' (images in [-1, 1] -> logits); needs --label")
    parser.add_argument("--label", help="the class to steer toward: an index or a class name (with --classifier)")
    parser.add_argument("--clip", default=DEFAULT_CLIP, metavar="SOURCE",
                        help=f"CLIP model for 'clip:' rewards, hub id or folder (default {DEFAULT_CLIP})")
    parser.add_argument("--weight", type=float, default=1.0, help="scale of the guidance objective (default 1)")
    parser.add_argument("--method", default="flowchef", help=f"{', '.join(METHODS)} (default flowchef)")
    parser.add_argument("--model", default="default",
                        help="hub id, local folder or 'default' (flowsteer models; default: default)")
    parser.add_argument("--num", type=int, default=1, help="images to generate, seeds SEED, SEED+1, ... (default 1)")
    parser.add_argument("--steps", type=int, default=28, help="sampling steps (default 28)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    add_size_argument(parser, "the model's")
    parser.add_argument("--height", type=int, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, help="image width (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, metavar="W", help="CFG scale (default: the model's)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a method option, e.g. --option step_size=0.3 --option candidates=8 (repeatable; "
                             "flowsteer methods lists them)")
    parser.add_argument("--compare", action="store_true",
                        help="also sample each image unguided from the same noise and score it")
    parser.add_argument("--out", default="generated", metavar="DIR", help="output folder (default: generated)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from .memory_option import add_memory_argument

    add_memory_argument(parser)
    parser.set_defaults(run=run)
