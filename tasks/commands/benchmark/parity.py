"""Parity presets as benchmark runs, and caption files.

A parity preset (:mod:`guidance.features.presets`) fixes the whole published setting: the method and its options, the
number of steps, the operators, the measurement noise, the objective, the model, its dtype and autoencoders, the
image size, the prompt, the negative prompt, the guidance scale and the seed. :func:`preset_run` turns one into
:func:`tasks.commands.benchmark.run_benchmark` arguments; every argument the user gives explicitly overrides the preset
and is recorded as an override, so a summary says whether it is the published setting or not.

Caption files are the official FLAIR format (src/flair/utils/data_utils.py, ``load_captions_from_file``): one
line per image, ``<file name>: <caption>``; the prompt of an image is ``"<preset prompt> <caption>"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["PRESET_ARGUMENTS", "preset_run", "read_captions", "image_prompts"]

# run_benchmark argument -> the preset key that sets it
PRESET_ARGUMENTS = {
    "model": "model", "dtype": "dtype", "decoder": "decoder", "encoder": "encoder", "size": "resolution",
    "seed": "seed", "num_steps": "num_steps", "prompt": "prompt", "negative_prompt": "negative_prompt",
    "guidance_scale": "guidance_scale", "noise_std": "noise_std",
}


def preset_run(name: str, given: dict[str, Any], operators: list[str], methods: list[str],
               options: dict[str, dict], official_quirks: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arguments, record)`` of the preset ``name`` (its parity variant with ``official_quirks``, see
    :func:`guidance.features.presets.get_preset`) under the user's explicit values.

    ``given`` maps :data:`PRESET_ARGUMENTS` names to the user's values (None: not given). ``operators`` and
    ``methods`` replace the preset's when non-empty; ``options`` are laid over the preset method's options.
    ``arguments`` holds every preset-driven run argument plus ``operators``, ``methods``, ``options``, ``space``
    and ``objective_options``; ``record`` is what the benchmark stores: the preset's name, source and full
    content, and the overrides (argument -> {"preset": value, "used": value}).
    """
    from guidance.features.presets import get_preset

    preset = get_preset(name, official_quirks)
    if preset.get("objective") is None:
        raise ValueError(f"the preset {name!r} is a {preset['method']} setting without a measurement; it cannot "
                         f"be benchmarked on restoration (use it with flowsteer edit)")
    method = preset["method"]
    if methods and methods != [method]:
        raise ValueError(f"the preset {name!r} is a {method} setting; drop --methods (or give --methods {method})")
    stray = sorted(set(options) - {method})
    if stray:
        raise ValueError(f"--option given for {stray[0]!r}, but the preset {name!r} runs {method}")
    arguments: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for argument, key in PRESET_ARGUMENTS.items():
        published, value = preset.get(key), given.get(argument)
        arguments[argument] = published if value is None else value
        if value is not None and value != published:
            overrides[argument] = {"preset": published, "used": value}
    published_ops = list(preset.get("operators") or [])
    arguments["operators"] = operators or published_ops
    if operators and operators != published_ops:
        overrides["operators"] = {"preset": published_ops, "used": operators}
    user = dict(options.get(method, {}))
    arguments["options"] = {method: {**preset.get("options", {}), **user}}
    changed = {k: v for k, v in user.items() if preset.get("options", {}).get(k, object()) != v}
    if changed:
        overrides["options"] = {"preset": {k: preset.get("options", {}).get(k) for k in changed}, "used": changed}
    objective = dict(preset["objective"])
    arguments["methods"] = [method]
    arguments["space"] = objective.pop("space", "pixel")
    arguments["objective_options"] = objective
    record = {"name": name, "source": preset.get("source"), "official_quirks": official_quirks, "preset": preset,
              "overrides": overrides}
    return arguments, record


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``{file name: caption}`` from a caption file (``<file name>: <caption>`` per line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"the caption file {str(path)!r} does not exist; give a text file with one "
                         f"'<image file name>: <caption>' line per image")
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, caption = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"line {number} of the caption file {str(path)!r} is not '<image file name>: "
                             f"<caption>': {line.strip()[:80]!r}")
        if name.strip() in captions:
            raise ValueError(f"the caption file {str(path)!r} names {name.strip()!r} twice (line {number})")
        captions[name.strip()] = caption.strip()
    return captions


def image_prompts(files: list[str], prompt: str | None, captions: dict[str, str] | None) -> dict[str, str | None]:
    """The prompt of each image file: ``prompt`` alone, or ``"<prompt> <caption>"`` with captions (matched by file
    name, or by stem); a ValueError names the images without a caption."""
    if captions is None:
        return {file: prompt for file in files}
    by_stem = {Path(name).stem: caption for name, caption in captions.items()}
    missing = [f for f in files if f not in captions and Path(f).stem not in by_stem]
    if missing:
        raise ValueError(f"the caption file has no caption for {missing[0]!r}"
                         f"{f' and {len(missing) - 1} more image(s)' if len(missing) > 1 else ''}; add a "
                         f"'{missing[0]}: <caption>' line")
    prompts = {}
    for file in files:
        caption = captions.get(file, by_stem.get(Path(file).stem, ""))
        prompts[file] = " ".join(part for part in (prompt, caption) if part)
    return prompts
