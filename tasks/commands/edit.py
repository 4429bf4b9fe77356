"""Editing real images: by text (FlowEdit, RF-Inversion, RF-Solver editing, FlowChef editing), or toward a
classifier label or a reward after inverting the image (inversion_edit, the editor of models without text).

    flowsteer edit photo.png --source-prompt "a photo of a cat" --edit-prompt "a photo of a dog" --model MODEL
    flowsteer edit photo.png --method flowchef_edit --mask mask.png --source-prompt ... --edit-prompt ...
    flowsteer edit photo.png --classifier default --label texture --strength 0.7      # the default model
    flowsteer edit FOLDER --prompts edits.yaml --model MODEL --out results              # a batch

The mask is an image of the photo's size: WHITE (1) marks the region to edit, BLACK (0) the region to keep
(grey values blend; colour masks are read as their luma, transparent pixels as white). Without ``--method``, a
text edit runs FlowEdit (its masked variant with ``--mask``) and a classifier or reward runs inversion_edit. The
kept region follows the photo as the autoencoder reconstructs it, so it is close to the input, not identical.

A prompts file lists edits as FlowEdit's ``edits.yaml`` does (YAML or JSON): entries with ``input_img`` (a path
relative to FOLDER), ``source_prompt``, ``target_prompts`` (a list, or ``edit_prompt``: one text) and optionally
``mask``; each edit is written to ``OUT/<image stem>/<k>/`` and skipped when already there (a batch resumes).

From code: ``edit("photo.png", None, "a photo of a cat", "a photo of a dog", model=model, out="dog")``
(image and mask may also be tensors, PIL images or NumPy arrays).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from guidance import get_method
from guidance.loading.devices import check_device
from guidance.loading.files import write_text_atomic
from guidance.loading.images import ImageOutput, check_output_type
from operators.checks import MAX_STEPS, check_int, check_seed

from ..outputs.folders import prepare_output_dir, write_outputs
from ..outputs.grid import save_grid
from ..outputs.image_io import load_image, save_image

__all__ = ["METHODS", "OUTPUT_NAMES", "Edit", "EditJob", "choose_method", "edit", "edit_folder", "read_mask",
           "read_prompts"]

OUTPUT_NAMES = ("edited.png", "grid.png", "metrics.json")
INPUTS = ("source_image", "mask", "source_prompt", "edit_prompt")  # editor arguments that are not options
#: the editors, by registered name (``flowsteer edit --method``)
METHODS = ("flowedit", "rf_inversion", "rf_solver_edit", "flowchef_edit", "inversion_edit")
#: each editor's number of steps by default: its paper's reference setting
DEFAULT_STEPS = {"flowedit": 28, "rf_inversion": 28, "rf_solver_edit": 25, "flowchef_edit": 30, "inversion_edit": 28}
TEXT_ONLY = ("flowedit", "rf_inversion")  # no objective
NO_MASK = ("rf_inversion",)
NEEDS_MASK = ("flowchef_edit",)
NEEDS_SOURCE_PROMPT = ("flowedit", "flowchef_edit")
DETERMINISTIC = ("inversion_edit", "rf_solver_edit")  # no noise: they take no generator


@dataclass
class Edit(ImageOutput):
    """The ``edited`` image and the ``source`` image (1, 3, H, W) in [-1, 1], the ``mask`` (1, 1, H, W) in [0, 1]
    (1 = edit), ``metrics`` (time, NFE, mean absolute change inside / outside the mask, and
    the autoencoder's own round-trip error, the floor of the change outside) and every ``settings`` value;
    ``images`` is the edited image as diffusers returns images (``output_type``)."""

    edited: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    output_type: str = "pil"

    @property
    def image(self) -> torch.Tensor:
        return self.edited


def read_mask(mask) -> torch.Tensor:
    """A mask file, PIL image or NumPy array (white = edit) or tensor (H, W) / (1, 1, H, W) in [0, 1] (1 = edit) as a
    (1, 1, H, W) float tensor."""
    from .restore import read_image

    if isinstance(mask, torch.Tensor):
        m = mask.float()
        while m.ndim < 4:
            m = m[None]
        if m.ndim != 4 or m.shape[:2] != (1, 1):
            raise ValueError(f"a mask tensor must have shape (H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
        if not bool(torch.isfinite(m).all()) or m.min() < 0 or m.max() > 1:
            raise ValueError("mask values must lie in [0, 1] (1 = region to edit, 0 = region to keep)")
        return m
    if not isinstance(mask, (str, os.PathLike)):  # PIL or NumPy, as images are taken
        m = (load_image(mask, channels=1) + 1) / 2
        if m.shape[0] != 1:
            raise ValueError(f"edit takes one mask, got a batch of {m.shape[0]}")
        return m
    return (read_image(mask, "mask", channels=1) + 1) / 2


def _read_source(image) -> torch.Tensor:
    """The input image from a path (errors name its role), a PIL image, a NumPy array or a tensor."""
    from .restore import read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image, "input image")
    source = load_image(image)
    if source.shape[0] != 1:
        raise ValueError(f"edit takes one image, got a batch of {source.shape[0]}; edit them one at a time")
    return source


def _change(edited: torch.Tensor, source: torch.Tensor, weight: torch.Tensor) -> float | None:
    """Mean |edited − source| over the pixels weighted by ``weight`` (None when the region is empty)."""
    total = float(weight.sum())
    if total <= 0:
        return None
    return float(((edited - source).abs().mean(1, keepdim=True) * weight).sum() / total)


def choose_method(method: str | None, guided: bool) -> str:
    """The editor to run: ``method`` when given (one of :data:`METHODS`), else inversion_edit for an edit toward a
    classifier or reward and FlowEdit (its masked variant with a mask) for a text edit."""
    if method is None:
        return "inversion_edit" if guided else "flowedit"
    if method not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(method), METHODS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown editing method {method!r}{hint} Editors: {', '.join(METHODS)} (--method)")
    return method


def _check_prompts(method: str, source_prompt, edit_prompt, guided: bool) -> None:
    for name, prompt in (("source prompt", source_prompt), ("edit prompt", edit_prompt)):
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise ValueError(f"the {name} must be a non-empty text (--{name.replace(' ', '-')})")
    if method in NEEDS_SOURCE_PROMPT and source_prompt is None:
        raise ValueError(f"{method} needs the source prompt describing the image (--source-prompt)")
    if method != "inversion_edit" and edit_prompt is None:
        raise ValueError(f"{method} needs the edit prompt describing the result (--edit-prompt)")
    if method == "inversion_edit" and edit_prompt is None and not guided:
        raise ValueError("inversion_edit edits toward an edit prompt, a classifier label (--classifier with --label) "
                         "or a reward (--reward); give at least one")
    if method == "inversion_edit" and source_prompt is not None and edit_prompt is None:
        raise ValueError("--source-prompt describes the image for an --edit-prompt; give the edit prompt too")


def edit(image, mask=None, source_prompt: str | None = None, edit_prompt: str | None = None, *,
         method: str | None = None, model: Any = "default", num_steps: int | None = None, seed: int = 0,
         options: dict | None = None, guidance_scale: float | None = None, strength: float | None = None,
         reward: Any = None, classifier: Any = None, label: Any = None, weight: float = 1.0,
         resize: bool = False, out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
         device: str | None = None, dtype: Any = None, output_type: str = "pil", memory: str | None = None) -> Edit:
    """Edit ``image`` with one of :data:`METHODS`: toward ``edit_prompt`` (from ``source_prompt``, which describes
    the image), toward a ``classifier``'s ``label`` or a ``reward`` (scaled by ``weight``), inside ``mask`` (white
    = edit) when given.

    ``method`` None picks FlowEdit for text edits and inversion_edit for a classifier or reward (the only editor of
    models without text, such as the default model). ``num_steps`` defaults to the method's own (FlowEdit 28,
    RF-Inversion 28, RF-Solver editing 25, FlowChef editing 30, inversion_edit 28). ``strength`` (inversion_edit,
    rf_inversion) is the fraction of the schedule inverted and regenerated. ``options`` are the method's own
    (``flowsteer methods`` lists them). ``guidance_scale`` is the model's guidance of the edit prompt (the
    method's default when None). With ``out``, writes edited.png, grid.png (input, mask, edited) and metrics.json;
    everything cheap is checked before the model loads. ``memory`` is a memory profile (a run the planner says
    does not fit is refused before the model loads)."""
    from guidance.methods import method_options

    from .memory_option import preload_profile
    from .restore import fit_size, open_model, peak_memory, resize_image

    check_output_type(output_type)
    guided = reward is not None or classifier is not None
    method = choose_method(method, guided)
    own = method_options(method)
    if num_steps is None:
        num_steps = DEFAULT_STEPS[method]
    check_int(num_steps, "the number of steps (--steps)", 1, MAX_STEPS)
    check_seed(seed, "the seed (--seed)")
    _check_prompts(method, source_prompt, edit_prompt, guided)
    options = dict(options or {})
    taken = sorted(set(options) & set(INPUTS))
    if taken:
        raise ValueError(f"{taken[0]!r} is an input of edit, not an option; pass it as the image, mask or prompt")
    for name, value, flag in (("guidance_scale", guidance_scale, "--guidance-scale"),
                              ("strength", strength, "--strength")):
        if value is None:
            continue
        if name not in own:
            raise ValueError(f"{method} has no {name} ({flag}); it is an option of "
                             f"{', '.join(m for m in METHODS if name in method_options(m))}")
        options[name] = value
    if guided and method in TEXT_ONLY:
        raise ValueError(f"{method} edits with prompts only; a classifier or reward needs --method "
                         f"{' or '.join(m for m in METHODS if m not in TEXT_ONLY)}")
    if mask is not None and method in NO_MASK:
        raise ValueError(f"{method} edits the whole image; for a masked edit use --method flowedit (its masked "
                         f"variant) or inversion_edit")
    if mask is None and method in NEEDS_MASK:
        raise ValueError(f"{method} edits inside a mask: give --mask (white = edit), or use --method flowedit")
    get_method(method, **options)  # unknown options fail before the model loads
    device = check_device(device)  # before anything loads: a missing GPU is named, not met in torch
    source = _read_source(image)
    size = tuple(source.shape[-2:])
    pixel_mask = None if mask is None else read_mask(mask)
    if pixel_mask is not None and tuple(pixel_mask.shape[-2:]) != size:
        raise ValueError(f"the mask is {pixel_mask.shape[-2]}x{pixel_mask.shape[-1]} pixels but the image is "
                         f"{size[0]}x{size[1]}; give a mask of the image's size (white = edit, black = keep)")
    guide = None
    if guided:
        from guidance.features.rewards import make_guide

        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"the guidance weight (--weight) must be a finite number, got {weight!r}")
        guide = make_guide(reward=reward, classifier=classifier, label=label, weight=weight, device=device)
    elif label is not None:
        raise ValueError("--label goes with --classifier (the class to edit toward); give the classifier too")
    if out is not None:
        inputs = [p for p in (image, mask) if isinstance(p, (str, os.PathLike))]
        out = prepare_output_dir(out, OUTPUT_NAMES, overwrite=overwrite, inputs=inputs)

    memory = preload_profile(model, memory, method, None if resize else size, 1, device, dtype, "edit", options)
    net = open_model(model, device=device, dtype=dtype, progress=progress, memory=memory)
    if (source_prompt is not None or edit_prompt is not None) and not getattr(net, "takes_text", False):
        name = getattr(net, "name_or_path", None) or type(net).__name__
        raise ValueError(f"editing follows the edit prompt, but the model {name!r} takes no text: use a "
                         f"text-conditioned model (SD3 / SD3.5 or FLUX.1, e.g. --model "
                         f"stabilityai/stable-diffusion-3.5-medium or a local folder of one), or edit toward a "
                         f"classifier label without prompts (--classifier default --label texture)")
    target = fit_size(net, *size, resize, what="input image")
    source = resize_image(source, target)
    if pixel_mask is not None and target != size:
        pixel_mask = F.interpolate(pixel_mask, size=target, mode="bilinear", antialias=True).clamp(0, 1)
    if method == "flowchef_edit":
        options.setdefault("source_steps", max(1, round(num_steps / 3)))
        if "step_size" not in options:
            n = math.prod(net.latent_shape(*target))
            weight_pull = float(options.get("source_weight", own["source_weight"]))
            options["step_size"] = min(0.6, n / (4 * weight_pull)) if weight_pull > 0 else 0.6

    if net.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(net.device)
    inputs = {"source_image": source.to(net.device), "source_prompt": source_prompt, "edit_prompt": edit_prompt}
    if pixel_mask is not None:
        inputs["mask"] = pixel_mask.to(net.device)
    if method not in DETERMINISTIC:
        inputs["generator"] = torch.Generator().manual_seed(seed)
    begin = time.perf_counter()
    result = get_method(method, **options)(net, None if guide is None else guide.objective, num_steps=num_steps,
                                           progress=progress, **inputs)
    if net.device.type == "cuda":
        torch.cuda.synchronize(net.device)
    seconds = time.perf_counter() - begin
    edited = result.image.detach().float().cpu().clamp(-1, 1)[:1]
    with torch.no_grad():  # the autoencoder's round trip D(E(x)): the floor of the change outside the mask
        reconstruction = net.decode(result.info["source_latent"][:1]).float().cpu().clamp(-1, 1)
    everywhere = torch.ones(1, 1, *target)
    metrics = {"seconds": seconds, "nfe": result.nfe,
               "change": _change(edited, source, everywhere),
               "change_inside_mask": None if pixel_mask is None else _change(edited, source, pixel_mask),
               "change_outside_mask": None if pixel_mask is None else _change(edited, source, 1 - pixel_mask),
               "autoencoder_error": float((reconstruction - source.cpu()).abs().mean()), **peak_memory(net.device)}
    if guide is not None:
        with torch.no_grad():
            metrics["score_source"] = float(guide.score(source.to(net.device)).mean())
            metrics["score_edited"] = float(guide.score(edited.to(net.device)).mean())
    settings = {
        "input": str(image) if isinstance(image, (str, os.PathLike)) else "tensor",
        "mask": None if mask is None else str(mask) if isinstance(mask, (str, os.PathLike)) else "tensor",
        "source_prompt": source_prompt, "edit_prompt": edit_prompt, "method": method,
        "options": {k: v for k, v in {**own, **options}.items() if k not in INPUTS},
        "guide": None if guide is None else guide.settings, "num_steps": num_steps,
        "seed": None if method in DETERMINISTIC else seed,
        "resize": resize, "input_size": list(size), "height": target[0], "width": target[1],
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(net).__name__,
        "device": str(net.device), "dtype": str(getattr(net, "dtype", "")).replace("torch.", ""),
        "out": None if out is None else str(out)}
    shown_mask = torch.ones(1, 1, *target) if pixel_mask is None else pixel_mask
    result = Edit(edited=edited, source=source, mask=shown_mask, metrics=metrics, settings=settings,
                  output_type=output_type)
    if out is not None:
        save_edit(result, out)
    return result


def save_edit(result: Edit, out: str | os.PathLike) -> Path:
    """Write edited.png, grid.png (input, mask, edited) and metrics.json (metrics plus settings) atomically."""
    out = Path(out)
    metrics = json.dumps({**result.metrics, "settings": result.settings}, indent=2, default=str) + "\n"
    cells = [[result.source, result.mask * 2 - 1, result.edited]]
    write_outputs([(out / "edited.png", lambda path: save_image(result.edited, path)),
                   (out / "grid.png", lambda path: save_grid(path, cells, [["input", "mask", "edited"]])),
                   (out / "metrics.json", lambda path: write_text_atomic(path, metrics))])
    return out


# -- a folder of images with a prompts file ------------------------------------------------------------------
@dataclass
class EditJob:
    """One edit of a prompts file: the image, its mask (or None), the prompts and where its outputs go."""

    image: Path
    mask: Path | None
    source_prompt: str | None
    edit_prompt: str
    out: Path


def read_prompts(prompts: str | os.PathLike, folder: str | os.PathLike, out: str | os.PathLike) -> list[EditJob]:
    """The edits of a prompts file (FlowEdit's edits.yaml layout, YAML or JSON), checked before any model loads:
    every image and mask exists and every entry has its prompts."""
    path, folder, out = Path(prompts), Path(folder), Path(out)
    if not path.is_file():
        raise ValueError(f"the prompts file {str(path)!r} does not exist; give a YAML or JSON file (--prompts)")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            entries = json.loads(text)
        else:
            import yaml

            entries = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 (a parser's own error type, reported in one line)
        raise ValueError(f"the prompts file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'YAML'}: "
                         f"{str(error).splitlines()[0]}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"the prompts file {str(path)!r} must hold a list of edits (input_img, source_prompt, "
                         f"target_prompts), as FlowEdit's edits.yaml does")
    jobs = []
    for n, entry in enumerate(entries):
        where = f"entry {n} of {path.name}"
        if not isinstance(entry, dict) or "input_img" not in entry:
            raise ValueError(f"{where} needs input_img (an image path relative to {str(folder)!r})")
        targets = entry.get("target_prompts", entry.get("edit_prompt"))
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"{where} needs target_prompts (a list of texts) or edit_prompt (one text)")
        image = folder / str(entry["input_img"])
        if not image.is_file():
            raise ValueError(f"{where}: the image {str(image)!r} does not exist; input_img is relative to the folder")
        mask = None if entry.get("mask") is None else folder / str(entry["mask"])
        if mask is not None and not mask.is_file():
            raise ValueError(f"{where}: the mask {str(mask)!r} does not exist; mask is relative to the folder")
        source_prompt = entry.get("source_prompt")
        if source_prompt is not None and not isinstance(source_prompt, str):
            raise ValueError(f"{where}: source_prompt must be a text")
        for k, target in enumerate(targets):
            jobs.append(EditJob(image, mask, source_prompt, target, out / image.stem / str(k)))
    return jobs


def edit_folder(folder, prompts, *, out, model: Any = "default", overwrite: bool = False, progress: bool = True,
                device: str | None = None, dtype: Any = None, memory: str | None = None,
                **settings) -> list[Path]:
    """Run every edit of ``prompts`` on the images of ``folder`` (see :func:`read_prompts`) with one loaded model;
    ``settings`` are :func:`edit`'s (method, num_steps, seed, options, guidance_scale, strength, resize).
    Edits whose outputs exist are skipped (unless ``overwrite``); returns the folders written."""
    from .restore import open_model

    if not Path(folder).is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; give a folder of images with --prompts, or one image")
    jobs = read_prompts(prompts, folder, out)
    method = choose_method(settings.get("method"), False)
    for job in jobs:
        _check_prompts(method, job.source_prompt, job.edit_prompt, False)
    net = open_model(model, device=check_device(device), dtype=dtype, progress=progress, memory=memory)
    written = []
    for job in jobs:
        if not overwrite and all((job.out / name).is_file() for name in OUTPUT_NAMES):
            continue
        edit(job.image, job.mask, job.source_prompt, job.edit_prompt, model=net, out=job.out, overwrite=True,
             progress=progress, **settings)
        written.append(job.out)
    return written


# -- `flowsteer edit` ------------------------------------------------------------------------------------------
def run(args) -> int:
    """Edit one image (or a folder with a prompts file) and write the results."""
    from .restore import cli_messages, parse_options

    common = dict(method=args.method, num_steps=args.steps, seed=args.seed, options=parse_options(args.option),
                  guidance_scale=args.guidance_scale, strength=args.strength, resize=args.resize)
    if args.prompts is not None or Path(args.input).is_dir():
        if args.prompts is None:
            print(f"flowsteer edit: error: {args.input} is a folder: give --prompts FILE with its edits",
                  file=sys.stderr)
            return 2
        stray = [flag for flag, value in (("--mask", args.mask), ("--source-prompt", args.source_prompt),
                                          ("--edit-prompt", args.edit_prompt), ("--classifier", args.classifier),
                                          ("--reward", args.reward)) if value is not None]
        if stray:
            print(f"flowsteer edit: error: {stray[0]} is set per edit in the prompts file with --prompts; drop it",
                  file=sys.stderr)
            return 2
        out = args.out or f"{Path(args.input).name}_edited"
        with cli_messages():
            written = edit_folder(args.input, args.prompts, out=out, model=args.model, overwrite=args.overwrite,
                                  progress=not args.quiet, device=args.device, dtype=args.dtype,
                                  memory=args.memory, **common)
        print(f"wrote {len(written)} edit(s) to {out}")
        return 0
    out = args.out or f"{Path(args.input).stem}_edited"
    with cli_messages():
        result = edit(args.input, args.mask, args.source_prompt, args.edit_prompt, model=args.model,
                      reward=args.reward, classifier=args.classifier, label=args.label, weight=args.weight,
                      out=out, overwrite=args.overwrite, progress=not args.quiet, device=args.device,
                      dtype=args.dtype, memory=args.memory, **common)
    m = result.metrics
    change = ", ".join(f"{where} {m[f'change_{where}_mask']:.3g}" for where in ("inside", "outside")
                       if m[f"change_{where}_mask"] is not None) or f"{m['change']:.3g}"
    score = f"; score {m['score_source']:.3g} -> {m['score_edited']:.3g}" if "score_edited" in m else ""
    print(f"{result.settings['method']}: {m['nfe']} NFE, {m['seconds']:.1f} s; mean change {change} (autoencoder "
          f"round trip {m['autoencoder_error']:.3g}){score}")
    print(f"wrote {', '.join(OUTPUT_NAMES)} to {out}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "edit", help="edit an image by text (FlowEdit, RF-Inversion, RF-Solver, FlowChef) or toward a classifier",
        description="Edit INPUT toward --edit-prompt (FlowEdit by default; --method picks another editor), or "
                    "toward a classifier label or a reward after inverting it (inversion_edit, which also runs on "
                    "models without text). With --mask only the white region changes. INPUT may be a folder with "
                    "--prompts FILE (FlowEdit's edits.yaml layout). Writes edited.png, grid.png and metrics.json.")
    parser.add_argument("input", metavar="INPUT", help="the image to edit, or a folder of images with --prompts")
    parser.add_argument("--method", choices=METHODS,
                        help="the editor (default: flowedit for text, inversion_edit for --classifier / --reward)")
    parser.add_argument("--mask", metavar="MASK",
                        help="mask image of INPUT's size: white = edit, black = keep (grey blends)")
    parser.add_argument("--source-prompt", metavar="TEXT", help="describes INPUT")
    parser.add_argument("--edit-prompt", metavar="TEXT", help="describes the edited image")
    parser.add_argument("--prompts", metavar="FILE",
                        help="with a folder INPUT: a YAML or JSON list of edits (input_img, source_prompt, "
                             "target_prompts, optional mask)")
    guide = parser.add_mutually_exclusive_group()
    guide.add_argument("--classifier", metavar="SOURCE",
                       help="edit toward --label of this classifier ('default' for the default model's)")
    guide.add_argument("--reward", metavar="SOURCE", help="edit toward a higher reward ('clip:TEXT', file.py:fn)")
    parser.add_argument("--label", help="the class to edit toward (with --classifier): an index or a class name")
    parser.add_argument("--weight", type=float, default=1.0, help="scale of the classifier or reward (default 1)")
    parser.add_argument("--strength", type=float,
                        help="inversion_edit, rf_inversion: the fraction of the schedule inverted and regenerated")
    parser.add_argument("--model", default="default",
                        help="hub id or local folder of the model (default: default, which takes no text)")
    parser.add_argument("--steps", type=int, help="steps (default: the method's own: 25 to 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the editor's noise (default 0)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="an option of the editor, e.g. --option n_max=24 (repeatable; flowsteer methods lists "
                             "them)")
    parser.add_argument("--guidance-scale", type=float, metavar="W",
                        help="the model's guidance of the edit prompt (default: the method's)")
    parser.add_argument("--resize", action="store_true",
                        help="resize image and mask to the nearest size the model accepts instead of stopping")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <INPUT stem>_edited)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from .memory_option import add_memory_argument

    add_memory_argument(parser)
    parser.set_defaults(run=run)
