"""`flowsteer operators | methods | models | presets`: what is available, with parameters and defaults."""

from __future__ import annotations

import argparse
import inspect
import json
import re

from guidance.backbones.registry import BACKBONES, known_models

from .cli import format_default, print_json

# Backbones flowsteer has adapters for (any local diffusers folder of these families loads too): (source, family,
# summary) rows read from the one backbone registry, guidance/backbones/registry.py.
KNOWN_MODELS = known_models()


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")        # :func:`~a.b.c` -> c, :class:`a.B` -> a.B
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def plain_text(doc: str | None, limit: int = 160) -> str:
    """The first paragraph of a docstring as plain text (reST roles and literals unwrapped) in whole sentences:
    the first sentence, then more while the text stays within ``limit`` characters; ends with a full stop."""
    paragraph = " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())
    paragraph = _ROLE.sub(lambda m: m.group(1).rpartition(".")[2] if m.group(0).count("~") else m.group(1),
                          paragraph)
    paragraph = _LITERAL.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), paragraph)
    sentences = _SENTENCE_END.split(paragraph.rstrip(":").strip())
    text = sentences[0]
    for sentence in sentences[1:]:
        if len(text) + 1 + len(sentence) > limit:
            break
        text += " " + sentence
    return text if not text or text[-1] in ".!?" else text + "."


def cmd_operators(args: argparse.Namespace) -> int:
    """List the registered forward operators with their parameters and defaults."""
    from operators import list_operators

    rows = []
    for entry in list_operators():
        rows.append({
            "name": entry.name,
            "summary": plain_text(inspect.getdoc(entry.cls)),
            "linear": "yes" if entry.cls.is_linear else ("per instance" if hasattr(entry.cls, "adjoint") else "no"),
            "parameters": {k: format_default(v) for k, v in entry.parameters().items()},
        })
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        print(f"{row['name']}  (linear: {row['linear']})  {row['summary']}")
        print("    " + ", ".join(f"{k}={v}" for k, v in row["parameters"].items()))
    print(f"\n{len(rows)} operators. Build one with a spec such as 'sr:factor=4,noise_std=0.01' or "
          f"'gaussian_blur:sigma=2 | sr:factor=2'.")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered guidance methods with their options and defaults."""
    from guidance.methods import _load, list_methods, method_options

    rows = []
    for name in list_methods():
        rows.append({"name": name, "summary": plain_text(_load(name).__doc__),
                     "options": {k: format_default(v) for k, v in method_options(name).items()}})
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        print(f"{row['name']}  {row['summary']}")
        if row["options"]:
            print("    " + ", ".join(f"{k}={v}" for k, v in row["options"].items()))
    print(f"\n{len(rows)} methods. Common arguments: num_steps, cond, height, width, generator, batch_size, latents.")
    return 0


def _cached(repo: str) -> str:
    if repo == "default":
        try:
            from guidance.backbones.default import check_default_model

            check_default_model()  # every file there and every weight file intact; nothing is loaded
            return "available"
        except (OSError, ValueError) as error:
            return f"not available: {str(error).splitlines()[0]}"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "model_index.json")
        return "in the local cache" if isinstance(found, str) else "not downloaded"
    except Exception:  # noqa: BLE001 - listing must not fail on a broken cache
        return "unknown"


def _classifier_labels(folder) -> tuple[list[str], str]:
    """The class names in a bundled classifier's config.json (nothing is loaded) and its status."""
    try:
        id2label = json.loads((folder / "config.json").read_text()).get("id2label") or {}
        return [str(id2label[k]) for k in sorted(id2label, key=int)], "available"
    except (OSError, ValueError, AttributeError) as error:
        return [], f"not available: {str(error).splitlines()[0]}"


def family_rows() -> list[dict]:
    """One row per backbone family with a diffusers pipeline: its pipeline classes, defaults and limits."""
    return [{"kind": "family", "source": None, "family": b.name, "title": b.title, "pipelines": list(b.pipelines),
             "also_loads": list(b.also_loads), "default_size": b.default_size, "default_steps": b.default_steps,
             "default_guidance": b.default_guidance, "notes": b.notes}
            for b in BACKBONES if b.pipelines]


def cmd_models(args: argparse.Namespace) -> int:
    """List the flow models flowsteer knows, and whether each is on this machine (nothing is downloaded), the
    bundled classifiers with their labels, then the pipeline families with their defaults."""
    from guidance.features.rewards import BUNDLED_CLASSIFIERS, bundled_classifier_dir

    rows = [{"kind": "model", "source": source, "family": family, "summary": summary, "status": _cached(source)}
            for source, family, summary in KNOWN_MODELS]
    classifiers = []
    for name, (_, summary) in BUNDLED_CLASSIFIERS.items():
        labels, status = _classifier_labels(bundled_classifier_dir(name))
        classifiers.append({"kind": "classifier", "source": name, "family": "classifier", "summary": summary,
                            "labels": labels, "status": status})
    families = family_rows()
    if args.json:
        print_json(rows + classifiers + families)
        return 0
    for row in rows:
        print(f"{row['source']}  [{row['family']}]  {row['summary']}\n    {row['status']}")
    print("\nAny local folder written by save_pretrained (a pipeline of a family below, or a generic transformer + "
          "scheduler + VAE) also works: --model path/to/folder.")
    print("\nBundled classifiers (flowsteer generate --classifier NAME --label LABEL):")
    for row in classifiers:
        print(f"{row['source']}  {row['summary']}\n    labels: {', '.join(row['labels']) or 'none'}; {row['status']}")
    print("\nFamilies (load_model / --model take a hub id, a folder or a pipeline object of each):")
    for row in families:
        also = f" (also {', '.join(row['also_loads'])})" if row["also_loads"] else ""
        print(f"{row['family']}  {row['title']}: {', '.join(row['pipelines'])}{also}\n    default "
              f"{row['default_size']}², {row['default_steps']} steps, {row['default_guidance']}"
              + (f"; {row['notes']}" if row["notes"] else ""))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """List the parity presets: each published setting with its method, steps, operators, model and source."""
    from guidance.features.presets import get_preset, list_presets

    rows = [{"name": name, **get_preset(name)} for name in list_presets()]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        model = f", {row['model']}" if row.get("model") else ""
        print(f"{row['name']}  {row['method']}, {row['num_steps']} steps{model}")
        print(f"    operators: {'; '.join(row.get('operators') or []) or 'none (editing)'}")
        print(f"    options: {', '.join(f'{k}={format_default(v)}' for k, v in row.get('options', {}).items())}")
        print(f"    source: {row['source']}")
    print(f"\n{len(rows)} presets. Run one with flowsteer benchmark --preset NAME --images DIR --out DIR.")
    return 0


def add_parser(commands) -> None:
    for name, run, text in (("operators", cmd_operators, "list the forward operators and their parameters"),
                            ("methods", cmd_methods, "list the guidance methods and their options"),
                            ("models", cmd_models, "list the known flow models and whether they are here"),
                            ("presets", cmd_presets, "list the published settings that benchmark --preset runs")):
        listing = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        listing.add_argument("--json", action="store_true", help="print the list as JSON")
        listing.set_defaults(run=run)
