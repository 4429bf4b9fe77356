"""Rewards and classifiers for guided generation, from the short specs the command line takes.

    reward = load_reward("clip:a red fox in the snow")            # CLIP image-text cosine similarity
    reward = load_reward("myrewards:sharpness")                    # any callable images -> (B,), higher is better
    classifier = load_classifier("google/vit-base-patch16-224")    # a transformers image classifier (hub id/folder)
    classifier = load_classifier("mymodels:classify")              # any callable images -> logits (B, classes)
    guide = make_guide(classifier="google/vit-base-patch16-224", label="tabby, tabby cat")

Images are (B, 3, H, W) in [-1, 1], and everything stays differentiable (the processors' resizing and
normalisation run in torch, see :func:`guidance.objectives.transformers_preprocess`). ``module:function`` also
takes ``path/to/file.py:function``; modules are looked up in the current folder too. Hub models are loaded with
``local_files_only`` when ``HF_HUB_OFFLINE`` is set and never run remote code; missing weights raise a
:class:`~guidance.loading.models.ModelNotFoundError` that says how to get them.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..loading.models import ModelNotFoundError, hub_offline
from ..objectives import (ClassifierObjective, Objective, RewardObjective, class_index, count_classes,
                          transformers_preprocess)

__all__ = ["BUNDLED_CLASSIFIERS", "DEFAULT_CLIP", "bundled_classifier_dir", "classifier_source", "Classifier", "Guide", "clip_reward", "import_callable", "load_classifier",
           "load_reward", "make_guide", "resolve_label"]

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


# -- loading ------------------------------------------------------------------------------------------------
def import_callable(spec: str, what: str = "function") -> Callable:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the callable (the current folder is searched
    for modules too)."""
    module, _, name = str(spec).rpartition(":")
    if not module or not name:
        raise ValueError(f"the {what} {spec!r} must be given as 'module:function' (or 'file.py:function')")
    try:
        if module.endswith(".py"):
            if not Path(module).is_file():
                raise ImportError(f"no file {module!r}")
            loader = importlib.util.spec_from_file_location(Path(module).stem, module)
            namespace = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(namespace)
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.append(os.getcwd())
            try:
                namespace = import_module(module)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
        function = getattr(namespace, name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the {what} {spec!r}: {error}") from None
    if not callable(function):
        raise ValueError(f"the {what} {spec!r} is not callable")
    return function


def _pretrained(cls, source: str, what: str, flag: str, weights: bool = False):
    """``cls.from_pretrained(source)`` (offline when HF_HUB_OFFLINE is set, no remote code) with a one-line
    error saying how to get missing weights; with ``weights``, refuse a model whose checkpoint lacks some of its
    weights (e.g. a CLIP folder read as a classifier would get a random classification head)."""
    path = Path(source).expanduser()
    looks_like_path = (source.startswith((".", "/", "~")) or source.count("/") > 1
                       or (os.sep != "/" and os.sep in source))
    if looks_like_path and not path.is_dir():
        raise ValueError(f"the {what} folder {source!r} does not exist; pass {flag} with a folder written by "
                         f"save_pretrained or a Hugging Face hub id")
    offline = hub_offline()
    try:
        loaded = cls.from_pretrained(str(path) if path.is_dir() else source, local_files_only=offline,
                                     trust_remote_code=False, **({"output_loading_info": True} if weights else {}))
    except (OSError, ValueError) as error:
        if path.is_dir():
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"cannot load the {what} from {source!r}: {first}") from None
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "locally or on the hub"
        raise ModelNotFoundError(
            f"could not load the {what} {source!r}: it was not found {where}. Download it with `hf download "
            f"{source}` on a machine with network access, or pass {flag} FOLDER (a local copy written by "
            f"save_pretrained)") from None
    if not weights:
        return loaded
    model, info = loaded
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{source!r} is not a complete {type(model).__name__}: its checkpoint lacks {missing[0]!r}"
                         f"{f' and {len(missing) - 1} more weights' if len(missing) > 1 else ''}, which would be "
                         f"random; pass {flag} with a model trained for this task")
    return model


def _features(output: Any) -> torch.Tensor:
    """CLIP features: a tensor (transformers 4) or the ``pooler_output`` of a model output (transformers 5)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _to(module: torch.nn.Module, device) -> torch.nn.Module:
    return module.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


# -- rewards ------------------------------------------------------------------------------------------------
def clip_reward(text: str, source: str = DEFAULT_CLIP, device: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """r(x) = cos(CLIP image features of x, CLIP text features of ``text``), in [-1, 1], per image. ``source`` is a
    hub id or a folder holding a CLIPModel with its tokenizer and image processor (as CLIPProcessor saves them)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    if not str(text).strip():
        raise ValueError("the CLIP reward needs a text: use --reward 'clip:a photo of a red fox'")
    model = _to(_pretrained(CLIPModel, source, "CLIP model", "--clip", weights=True), device)
    tokenizer = _pretrained(AutoTokenizer, source, "CLIP tokenizer", "--clip")
    preprocess = transformers_preprocess(_pretrained(AutoImageProcessor, source, "CLIP image processor", "--clip"))
    tokens = tokenizer([text], padding=True, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    with torch.no_grad():
        text_features = _features(model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))
    text_features = F.normalize(text_features.float(), dim=-1)

    def reward(images: torch.Tensor) -> torch.Tensor:
        features = _features(model.get_image_features(pixel_values=preprocess(images.float())))
        return (F.normalize(features.float(), dim=-1) @ text_features.T)[:, 0]

    reward.model = model
    return reward


def load_reward(spec: str | Callable, clip: str = DEFAULT_CLIP, device: Any = None) -> Callable:
    """``"clip:TEXT"`` (:func:`clip_reward` with the CLIP model ``clip``), ``"module:function"`` or a callable:
    images in [-1, 1] -> (B,) rewards, higher is better."""
    if callable(spec):
        return spec
    kind, sep, rest = str(spec).partition(":")
    if kind == "clip" and sep:
        return clip_reward(rest, clip, device)
    hint = " (did you mean 'clip:TEXT'?)" if difflib.get_close_matches(kind.lower(), ["clip"], n=1) else ""
    if not sep:
        raise ValueError(f"unknown reward {spec!r}{hint}: use 'clip:TEXT' or 'module:function'")
    try:
        return import_callable(spec, "reward")
    except ValueError as error:
        raise ValueError(f"{error}{hint}") from None


# -- classifiers --------------------------------------------------------------------------------------------
@dataclass
class Classifier:
    """``logits(images) -> (B, classes)`` on [-1, 1] images, with the class ``names`` when known."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    names: list[str] | None = None
    source: str = ""

    @property
    def num_classes(self) -> int | None:
        return len(self.names) if self.names else None


def _names(holder: Any) -> list[str] | None:
    """Class names from ``labels`` (a sequence) or a transformers-style ``config.id2label``."""
    labels = getattr(holder, "labels", None)
    if isinstance(labels, (list, tuple)) and labels:
        return [str(n) for n in labels]
    id2label = getattr(getattr(holder, "config", None), "id2label", None)
    if id2label:
        return [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
    return None


def load_classifier(source: str | Callable, device: Any = None) -> Classifier:
    """A transformers image-classification model (hub id or folder, with its image processor), a
    ``"module:function"`` or a callable returning logits (B, classes). A callable may carry ``labels`` (class
    names) or a transformers ``config`` for label names."""
    if callable(source):
        return Classifier(source, _names(source), getattr(source, "__name__", type(source).__name__))
    source = str(source)
    if ":" in source and not Path(source).expanduser().is_dir():
        function = import_callable(source, "classifier")
        return Classifier(function, _names(function), source)
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = _to(_pretrained(AutoModelForImageClassification, source, "classifier", "--classifier", weights=True),
                device)
    preprocess = transformers_preprocess(_pretrained(AutoImageProcessor, source, "classifier's image processor",
                                                     "--classifier"))

    def logits(images: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=preprocess(images.float())).logits

    logits.model = model
    return Classifier(logits, _names(model), source)


def resolve_label(label: int | str, names: list[str] | None = None, num_classes: int | None = None) -> int:
    """A class index from an index (``3``, ``"3"``) or a class name (:func:`guidance.objectives.class_index`:
    exact, then case-insensitive), within the classifier's classes (``names``, else ``num_classes`` when known)."""
    index = class_index(label, names)
    count = len(names) if names else num_classes
    if index < 0 or (count and index >= count):
        limit = f"0..{count - 1}" if count else "an index >= 0"
        if names:
            shown = ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            which = (f" for the classifier's {count} classes ({shown}), or a class name; `flowsteer models` lists "
                     f"the bundled classifiers' names")
        else:
            which = f" for the classifier's {count} classes (it has no class names)" if count else ""
        raise ValueError(f"label {index} is out of range: use {limit}{which}")
    return index


#: The classifiers shipped with the default model: name -> (its folder in the default model, what it is).
BUNDLED_CLASSIFIERS = {
    "default": ("classifier", "a small ConvNeXt image classifier trained with the default model, to guide with"),
    "default:judge": ("judge", "an independent small ResNet classifier of the same classes, to check guided "
                               "images with"),
}


def bundled_classifier_dir(name: str) -> Path:
    """The folder of the bundled classifier ``name`` (``default``, ``default:judge``) in the default model."""
    from ..backbones.default import default_model_dir

    if name not in BUNDLED_CLASSIFIERS:
        raise ValueError(f"unknown bundled classifier {name!r}: use {' or '.join(map(repr, BUNDLED_CLASSIFIERS))}")
    return default_model_dir() / BUNDLED_CLASSIFIERS[name][0]


def classifier_source(classifier: Any) -> Any:
    """A bundled classifier's name -> its folder (found from the installed package, not the current folder);
    any other source (hub id, folder, 'module:function', callable) unchanged."""
    if not isinstance(classifier, str):
        return classifier
    name = classifier.strip()
    own_module = Path("default.py").is_file() or Path(name).exists()  # a user's default.py:function or folder
    if name not in BUNDLED_CLASSIFIERS and name.startswith("default:") and not own_module:
        close = difflib.get_close_matches(name, BUNDLED_CLASSIFIERS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"unknown bundled classifier {name!r}{hint} The bundled ones are "
                         f"{' and '.join(map(repr, BUNDLED_CLASSIFIERS))} (flowsteer models lists them)")
    if name not in BUNDLED_CLASSIFIERS:
        return classifier
    folder = bundled_classifier_dir(name)
    if not (folder / "config.json").is_file():
        raise ValueError(f"the bundled classifier {name!r} is missing: no {folder / 'config.json'}; reinstall "
                         f"flowsteer or pass --classifier with a hub id or folder")
    return str(folder)


# -- objective + score --------------------------------------------------------------------------------------
@dataclass
class Guide:
    """What a guided run minimises (``objective``) and how its results are scored: ``score(images) -> (B,)``,
    higher is better (the reward, or log p(label) for a classifier)."""

    objective: Objective
    score: Callable[[torch.Tensor], torch.Tensor]
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)


def make_guide(*, reward: str | Callable | None = None, classifier: str | Callable | None = None,
               label: int | str | None = None, clip: str = DEFAULT_CLIP, weight: float = 1.0,
               device: Any = None) -> Guide:
    """The objective and score for a reward (``weight · r``) or for a classifier and label (−weight · log p)."""
    if (reward is None) == (classifier is None):
        raise ValueError("give either a classifier (--classifier with --label) or a reward (--reward), "
                         "exactly one of them")
    if classifier is None and label is not None:
        raise ValueError("--label goes with --classifier; a reward needs no label")
    if reward is not None:
        function = load_reward(reward, clip, device)
        settings = {"reward": reward if isinstance(reward, str) else getattr(reward, "__name__", "callable"),
                    "weight": float(weight)}
        if isinstance(reward, str) and reward.startswith("clip:"):
            settings["clip"] = clip
        objective = RewardObjective(function, weight=weight, name=f"the reward {settings['reward']!r}")
        return Guide(objective, objective.scores, "reward", settings)  # what it returns is checked
    if label is None:
        raise ValueError("a classifier needs --label, the class to steer toward (an index or a class name)")
    model = load_classifier(classifier_source(classifier), device)  # a bundled name -> its folder
    count = model.num_classes or count_classes(model.logits, (1, 3, 64, 64), device)  # before any model loads
    index = resolve_label(label, model.names, count)

    def log_probability(images: torch.Tensor) -> torch.Tensor:
        logits = model.logits(images)
        logits = logits.logits if hasattr(logits, "logits") else logits
        if logits.ndim != 2 or index >= logits.shape[1]:
            raise ValueError(f"the classifier must return logits (B, classes) with class {index}, got shape "
                             f"{tuple(logits.shape)}")
        return torch.log_softmax(logits.float(), dim=1)[:, index]

    bundled = isinstance(classifier, str) and classifier.strip() in BUNDLED_CLASSIFIERS
    settings = {"classifier": classifier.strip() if bundled else model.source, "label": index,
                "label_name": model.names[index] if model.names else None, "weight": float(weight)}
    objective = ClassifierObjective(model.logits, index, num_classes=count, weight=weight)
    return Guide(objective, log_probability, "classifier", settings)
