"""Calibrated regularization weights (CRW) for FLAIR: measure, store and look up w(s) for any flow model.

FLAIR (Erbach et al., "Solving Inverse Problems with FLAIR", NeurIPS 2025) weighs its flow-matching regularizer
at time s by how accurate the frozen model is there. On the grid s = linspace(1, 0, 100) and held-out clean
images x0 (latents z0 = E(x0))::

    MSE(s) = mean over images and elements of (v_theta(x_s, s, c) - (eps - z0))²,   x_s = (1 - s) z0 + s eps
    w(s)   = 0.5 · (1 / MSE(s)) / mean_s(1 / MSE(s))

so the weights average 0.5 over the grid. The official repository ships the measured tables of SD3.5-medium and
SD3.5-large (:func:`official_crw_table`; used automatically for those checkpoints at CFG scale 2); :func:`calibrate`
measures one for any other model or setting, caches it on disk and :func:`load_crw` finds it again.

Cache: one JSON file per model and setting in ``cache_dir`` (default ``$FLOWSTEER_CACHE/crw`` when the
environment variable is set, else ``~/.cache/flowsteer/crw``). The key is ``<name>-<fingerprint>-g<guidance>-<H>x<W>``:

* name: the model's ``name_or_path`` (or its pipeline's / transformer's ``_name_or_path``), else the class name;
* fingerprint: SHA-256 of the class name and a few parameter tensors (the first two and last two parameters of
  the velocity network, or the mixture parameters of an analytic flow), so two different checkpoints with the
  same name, or two untrained tiny models, never share a table;
* guidance: the condition's ``guidance_scale`` (and ``true_cfg_scale`` when present): CFG changes the
  velocity, hence its error;
* size: the image height x width in pixels. :func:`load_crw` falls back to the table of the same model and
  guidance measured at the nearest image area when the exact size was never calibrated.

A run that uses a cached table says so once, naming the file (a warning on the ``flowsteer`` logger, which the
command line prints on stderr); :func:`clear_crw` (``flowsteer calibrate --clear --model MODEL``) removes a model's
tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..loading.files import write_text_atomic
from ..flow import interpolate, velocity_target
from ..sampler import initial_noise

__all__ = [
    "CRWTable", "CRW_POINTS", "DEFAULT_CRW", "OFFICIAL_TABLES", "calibrate", "clear_crw", "crw_cache_dir", "crw_key",
    "load_crw", "model_identity", "official_crw_name", "official_crw_table", "resolve_crw", "shipped_crw",
]

CRW_POINTS = 100
SIGMA_ZERO_PROXY = 1e-3  # where the s = 0 point of the grid is measured (see calibrate)
_FORMAT = "flowsteer-crw-1"


@dataclass
class CRWTable:
    """A calibrated regularization weight table: ``weights[i]`` is w at ``sigmas[i]``.

    ``table(s)`` returns the weight of the table point nearest to s (FLAIR's lookup). ``mse`` holds the measured
    MSE(s) when the table was calibrated, None for hand-made tables; ``metadata`` says where it came from.
    """

    sigmas: torch.Tensor
    weights: torch.Tensor
    mse: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.sigmas = torch.as_tensor(self.sigmas, dtype=torch.float64).flatten().cpu()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).flatten().cpu()
        if self.mse is not None:
            self.mse = torch.as_tensor(self.mse, dtype=torch.float64).flatten().cpu()
        n = self.sigmas.numel()
        if n < 1 or self.weights.numel() != n or (self.mse is not None and self.mse.numel() != n):
            raise ValueError(f"a CRW table needs as many weights (and MSE values) as sigmas, got {n} sigmas, "
                             f"{self.weights.numel()} weights"
                             + ("" if self.mse is None else f", {self.mse.numel()} MSE values"))
        if not bool(torch.isfinite(self.sigmas).all()) or (self.sigmas < 0).any() or (self.sigmas > 1).any():
            raise ValueError("CRW table sigmas must lie in [0, 1]")
        if not bool(torch.isfinite(self.weights).all()) or (self.weights < 0).any():
            raise ValueError("CRW table weights must be finite and >= 0")
        self._points = self.sigmas.tolist()
        self._values = self.weights.tolist()

    def __call__(self, sigma: float | torch.Tensor) -> float:
        """w at the table point nearest to ``sigma`` (a Python float; no device synchronisation for floats)."""
        s = float(sigma)
        index = min(range(len(self._points)), key=lambda i: abs(self._points[i] - s))
        return self._values[index]

    def __len__(self) -> int:
        return len(self._points)

    @classmethod
    def constant(cls, weight: float, num_points: int = CRW_POINTS) -> "CRWTable":
        """The same w at every time (no calibration)."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"a constant CRW weight must be a finite number >= 0, got {weight!r}")
        return cls(torch.linspace(1, 0, num_points, dtype=torch.float64),
                   torch.full((num_points,), float(weight), dtype=torch.float64),
                   metadata={"kind": "constant", "weight": float(weight)})

    @classmethod
    def from_mse(cls, sigmas: torch.Tensor, mse: torch.Tensor, metadata: dict | None = None) -> "CRWTable":
        """w(s) = 0.5 · (1 / MSE(s)) / mean(1 / MSE) (the paper's normalisation: weights average 0.5)."""
        mse = torch.as_tensor(mse, dtype=torch.float64)
        if not bool(torch.isfinite(mse).all()) or (mse <= 0).any():
            raise ValueError("MSE values must be finite and > 0 to make CRW weights")
        inverse = 1.0 / mse
        return cls(sigmas, 0.5 * inverse / inverse.mean(), mse, dict(metadata or {}))

    # -- files ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "sigmas": self.sigmas.tolist(), "weights": self.weights.tolist(),
                "mse": None if self.mse is None else self.mse.tolist(), "metadata": self.metadata}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically (a temporary file in the same folder, then ``os.replace``):
        readers never see a partial file and a failed write leaves nothing behind."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CRWTable":
        """Read a table written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no CRW table at {str(path)!r}; measure one with "
                                    f"guidance.calibrate(model, clean_images, cond)")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != _FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return cls(data["sigmas"], data["weights"], data.get("mse"), data.get("metadata") or {})
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{str(path)!r} is not a valid CRW table ({error}); delete it and calibrate "
                             f"again") from None


# -- the official tables --------------------------------------------------------------------------------------
# FLAIR's official repository (prs-eth/FLAIR, commit c4f55f7) ships the measured flow-matching loss per time of two
# models, 100 values on s = linspace(1, 0, 100): LCFM/SD3_loss_v_MSE_DIV2k_neg_prompt.npy for SD3.5-medium (CFG
# scale 2, empty negative prompt; the table of configs/x12.yaml and configs/inpainting.yaml) and
# LCFM/SD3.5-large_MSE_DIV2k.npy for SD3.5-large. guidance/crw_tables/ holds both, the float32 values exactly,
# with the weights made as src/flair/var_post_samp.py makes them (regularizer_weight 0.5, reg-shift 0):
# w = 0.5 · (1 / (MSE + 1e-7)) / mean(1 / (MSE + 1e-7)).
OFFICIAL_TABLES = {  # table name -> the hub id whose checkpoints it was measured on
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
}
OFFICIAL_GUIDANCE = 2.0  # the CFG scale of the official configurations, at which the tables were measured
_TABLE_DIR = Path(__file__).resolve().parents[1] / "crw_tables"  # guidance/crw_tables


def official_crw_table(name: str) -> CRWTable:
    """The official table ``name`` ("sd3.5-medium" or "sd3.5-large"); a ValueError lists the names."""
    if name not in OFFICIAL_TABLES:
        raise ValueError(f"no official CRW table named {name!r}; the official tables are "
                         f"{', '.join(sorted(OFFICIAL_TABLES))}")
    return CRWTable.load(_TABLE_DIR / f"{name}.json")


def _names(model) -> list[str]:
    """Every name a model goes by: its own ``name_or_path``, its pipeline's and its transformer's."""
    names = [getattr(model, "name_or_path", None),
             getattr(getattr(model, "pipeline", None), "name_or_path", None),
             getattr(getattr(getattr(model, "transformer", None), "config", None), "_name_or_path", None)]
    return [n for n in names if isinstance(n, str) and n]


def official_crw_name(model, cond=None) -> str | None:
    """The name of the official table that applies to ``model`` under ``cond``, else None.

    A table applies when one of the model's names (hub id or folder) ends in the checkpoint's name
    ("stable-diffusion-3.5-medium" or "stable-diffusion-3.5-large"; a distilled "-turbo" does not) and the
    condition's CFG scale is the official 2; other scales change the velocity and call for :func:`calibrate`.
    """
    scale = getattr(cond, "guidance_scale", None)
    if not isinstance(scale, (int, float)) or float(scale) != OFFICIAL_GUIDANCE:
        return None
    for name in _names(model):
        stem = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
        for table, hub_id in OFFICIAL_TABLES.items():
            if stem == hub_id.rsplit("/", 1)[-1]:
                return table
    return None


# The table used when a model has none: the official SD3.5-medium table scaled so that w/s <= 1 on FLAIR's default
# grid (50 steps, s from 0.984 to 0.196). Unscaled, the table's w goes from 0.435 at the first step to a peak of
# 0.729 at s = 0.775 and 0.297 at the last step, where w/s = 1.51: an over-relaxation justified by SD3.5's measured
# accuracy at small s, which for a model of unknown accuracy amplifies the network's errors (on analytic priors with
# nearly degenerate covariances w/s > 2 diverges). Scaled by 1/1.51 = 0.661 it runs from 0.29 to 0.48 over the
# default grid and reaches w/s = 1 at the last step.
def _default_table() -> CRWTable:
    official = official_crw_table("sd3.5-medium")
    grid = torch.linspace(1.0, 0.18, 52, dtype=torch.float64)[1:-1].tolist()
    scale = 1.0 / max(official(s) / s for s in grid)
    return CRWTable(official.sigmas, official.weights * scale,
                    metadata={"kind": "default", "shape": "the official SD3.5-medium table", "scale": scale})


DEFAULT_CRW = _default_table()


# -- model identity and cache ---------------------------------------------------------------------------------
def _name(model) -> str:
    names = _names(model)
    return names[0] if names else type(model).__name__


def _identity_tensors(model) -> list[torch.Tensor]:
    network = getattr(model, "transformer", None)
    if network is None:
        network = getattr(model, "network", None)
    if isinstance(network, nn.Module):
        params = list(network.parameters())
        return params[:2] + params[-2:] if len(params) > 4 else params
    prior = getattr(model, "prior", None)
    if prior is not None and all(hasattr(prior, a) for a in ("weights", "means", "covariances")):
        return [prior.weights, prior.means, prior.covariances]
    return []


def model_identity(model) -> dict[str, str]:
    """``{"name", "fingerprint"}`` of a flow model (see the module docstring)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for t in _identity_tensors(model):
            digest.update(f"{tuple(t.shape)} {t.dtype}".encode())
            try:
                digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            except (RuntimeError, TypeError, NotImplementedError):  # e.g. quantized or meta tensors: shape only
                pass
    return {"name": _name(model), "fingerprint": digest.hexdigest()[:16]}


def _guidance(cond) -> str:
    parts = []
    for attribute in ("guidance_scale", "true_cfg_scale"):
        value = getattr(cond, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{float(value):g}")
    return "_".join(parts) or "none"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[-80:] or "model"


def _model_stem(model) -> str:
    """``<name>-<fingerprint>``: the part of every cache key that names the model."""
    identity = model_identity(model)
    return f"{_slug(identity['name'])}-{identity['fingerprint']}"


def _prefix(model, cond) -> str:
    return f"{_model_stem(model)}-g{_guidance(cond)}"


def crw_key(model, cond=None, height: int = 0, width: int = 0) -> str:
    """The cache file stem ``<name>-<fingerprint>-g<guidance>-<H>x<W>`` of a model, guidance setting and size."""
    return f"{_prefix(model, cond)}-{int(height or 0)}x{int(width or 0)}"


def crw_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FLOWSTEER_CACHE/crw``, else ``~/.cache/flowsteer/crw``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("FLOWSTEER_CACHE")
    return Path(root) / "crw" if root else Path.home() / ".cache" / "flowsteer" / "crw"


def load_crw(model, cond=None, height: int | None = None, width: int | None = None,
             cache_dir: str | os.PathLike | None = None) -> CRWTable | None:
    """The table of ``model`` for this guidance setting and size: its cached calibration, else the official table
    when the model is SD3.5-medium or -large at CFG scale 2 (:func:`official_crw_name`; its ``metadata["kind"]``
    is "official"); None when there is neither.

    Without an exact size match, the calibration of the same model and guidance at the nearest image area
    (|log area ratio|) is used.
    """
    folder = crw_cache_dir(cache_dir)
    cond = model.condition() if cond is None else cond
    prefix = _prefix(model, cond)  # as calibrate() stores it
    exact = folder / f"{prefix}-{int(height or 0)}x{int(width or 0)}.json"
    if exact.is_file():
        return _cached(exact)
    wanted = (height or 0) * (width or 0)
    candidates = []
    for path in folder.glob(f"{_glob_escape(prefix)}-*.json"):
        match = re.fullmatch(r"(\d+)x(\d+)", path.stem[len(prefix) + 1:])
        if match and int(match[1]) * int(match[2]) > 0:
            candidates.append((_area_distance(int(match[1]) * int(match[2]), wanted), path.name, path))
    if candidates:
        return _cached(min(candidates)[2])
    official = official_crw_name(model, cond)
    return official_crw_table(official) if official is not None else None


def _cached(path: Path) -> CRWTable:
    """A cached table, with the file it came from in ``metadata["path"]``."""
    table = CRWTable.load(path)
    table.metadata["path"] = str(path)
    return table


#: where :func:`resolve_crw` says that a run uses a cached table (a warning; the command line prints it)
LOG = logging.getLogger("flowsteer")
_ANNOUNCED: set = set()


def _announce_cached(table: CRWTable, model, cache_dir) -> None:
    """Say, once per table file (and version of it) in this process, that a run uses a table cached by
    ``flowsteer calibrate``, and how to stop it: a table written once changes every later FLAIR run of the model."""
    path = table.metadata.get("path")
    try:
        key = (path, Path(path).stat().st_mtime_ns)
    except (OSError, TypeError):
        key = (path, None)
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    name = table.metadata.get("name")
    model_flag = name if name and name != type(model).__name__ and " " not in str(name) else "MODEL"
    folder = f" --cache-dir {cache_dir}" if cache_dir is not None else ""
    LOG.warning(f"FLAIR uses the calibration table {path}, cached by `flowsteer calibrate` for this model; to stop "
                f"using it, delete that file or run `flowsteer calibrate --clear --model {model_flag}{folder}` "
                f"(or pass crw=..., --option crw=...)")


def clear_crw(model, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Delete the tables :func:`calibrate` cached for ``model`` (every guidance setting and size) in ``cache_dir``
    (default :func:`crw_cache_dir`) and return the files removed; FLAIR then falls back to the official, shipped
    or default table (:func:`resolve_crw`). ``flowsteer calibrate --clear --model MODEL`` runs it."""
    removed = []
    for path in sorted(crw_cache_dir(cache_dir).glob(f"{_glob_escape(_model_stem(model))}-g*.json")):
        path.unlink()
        removed.append(path)
    return removed


def _area_distance(area: int, wanted: int) -> float:
    """|log(area / wanted)|: how far a table measured at ``area`` pixels is from the size asked for (0 when
    either is unknown)."""
    return abs(math.log(area / wanted)) if area and wanted else 0.0


def shipped_crw(model, area: int = 0) -> CRWTable | None:
    """A table shipped in the model's own folder (``<folder>/calibration/*.json``, as the default model has),
    used only when it was measured on these very weights (same fingerprint); nearest image area first."""
    folder = getattr(model, "calibration_dir", None)
    if folder is None or not Path(folder).is_dir():
        return None
    fingerprint = model_identity(model)["fingerprint"]
    candidates = []
    for path in sorted(Path(folder).glob("*.json")):
        table = CRWTable.load(path)
        if table.metadata.get("fingerprint") != fingerprint:
            continue
        size = int(table.metadata.get("height", 0)) * int(table.metadata.get("width", 0))
        candidates.append((_area_distance(size, area), path.name, table))
    return min(candidates, key=lambda c: c[:2])[2] if candidates else None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def resolve_crw(crw, model, cond=None, height: int | None = None, width: int | None = None,
                cache_dir: str | os.PathLike | None = None) -> tuple[CRWTable, str]:
    """``(table, origin)`` for FLAIR's ``crw=`` option:

    * a :class:`CRWTable` (origin ``"given"``); a number: a constant weight (``"constant"``);
    * the name of an official table, ``"sd3.5-medium"`` or ``"sd3.5-large"`` (origin ``"official:<name>"``), or
      a path to a saved table (origin: the path);
    * None (automatic, :func:`load_crw`): the model's cached calibration (``"cache"``); else the official table
      when the model is SD3.5-medium or -large at the official CFG scale 2 (``"official:<name>"``); else the
      table shipped with its weights (:func:`shipped_crw`, ``"shipped"``); else :data:`DEFAULT_CRW`
      (``"default"``).
    """
    if isinstance(crw, CRWTable):
        return crw, "given"
    if isinstance(crw, str) and crw in OFFICIAL_TABLES:
        return official_crw_table(crw), f"official:{crw}"
    if isinstance(crw, (str, os.PathLike)):
        return CRWTable.load(crw), str(crw)
    if isinstance(crw, (int, float)) and not isinstance(crw, bool):
        return CRWTable.constant(float(crw)), "constant"
    if crw is None:
        table = load_crw(model, cond, height, width, cache_dir)
        if table is not None:
            official = table.metadata.get("kind") == "official"
            if not official:
                _announce_cached(table, model, cache_dir)
            return table, f"official:{table.metadata['name']}" if official else "cache"
        table = shipped_crw(model, (height or 0) * (width or 0)) if cond is None else None
        return (table, "shipped") if table is not None else (DEFAULT_CRW, "default")
    raise ValueError(f"crw must be a CRWTable, an official table name ({', '.join(sorted(OFFICIAL_TABLES))}), a "
                     f"path to a saved table, a constant weight or None (automatic), got {type(crw).__name__}")


# -- measurement ----------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate(model, images: torch.Tensor, cond=None, *, num_points: int = CRW_POINTS,
              generator: torch.Generator | None = None, batch_size: int = 8,
              cache_dir: str | os.PathLike | None = None, progress: bool = True, save: bool = True) -> CRWTable:
    """Measure the CRW table of ``model`` on clean ``images`` (B, C, H, W) in [-1, 1] and cache it.

    For each s on ``linspace(1, 0, num_points)`` and each image (latent z0 = E(x0), the encoder's mean), one fresh
    eps ~ N(0, I) from ``generator`` gives x_s = (1 - s) z0 + s eps; MSE(s) is the per-element mean of
    (v_theta(x_s, s, c) − (eps − z0))² and w(s) = 0.5 · (1/MSE(s)) / mean(1/MSE) (FLAIR, Erbach et al. 2025).
    The s = 0 point is measured at s = 1e-3: a network is never asked at exactly s = 0 in sampling and some
    backbones treat timestep 0 specially; the error there is already the s → 0 limit (the noise is unobservable).

    Args:
        cond: the condition used when restoring (calibrate with the same CFG setting, e.g. scale 2 with an empty
            negative prompt for SD3.5); one condition (batch 1) for all images; None: the model's default.
        batch_size: images per network call.
        cache_dir: where the table is saved (see :func:`crw_cache_dir`); ``save=False`` keeps it in memory only.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, C, H, W) in [-1, 1], got {got}")
    if images.shape[1] != model.image_channels:
        raise ValueError(f"images have {images.shape[1]} channels but the model takes {model.image_channels}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or infinite values")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    height, width = int(images.shape[-2]), int(images.shape[-1])
    model.check_size(height, width)
    if cond is None:
        cond = model.condition()
    if int(getattr(cond, "batch_size", 1) or 1) != 1:
        raise ValueError("calibrate takes one condition for all images (a single prompt); "
                         "calibrate per prompt if the prompts differ")

    latents = torch.cat([model.encode(images[i:i + batch_size].to(model.device).float())
                         for i in range(0, images.shape[0], batch_size)])
    grid = torch.linspace(1, 0, num_points, dtype=torch.float64)
    totals = torch.zeros(num_points, dtype=torch.float64, device=latents.device)
    for j in tqdm(range(num_points), disable=not progress, desc="calibrating CRW"):
        s = max(float(grid[j]), SIGMA_ZERO_PROXY)
        for i in range(0, latents.shape[0], batch_size):
            z0 = latents[i:i + batch_size]
            eps = initial_noise(tuple(z0.shape), generator, z0.device)
            v = model.velocity(interpolate(z0, eps, s), s, cond)
            totals[j] += (v - velocity_target(z0, eps)).double().square().sum()
    mse = (totals / latents.numel()).cpu()

    identity = model_identity(model)
    metadata = {"kind": "calibrated", **identity, "guidance": _guidance(cond), "height": height, "width": width,
                "num_images": int(images.shape[0]), "num_points": num_points,
                "sigma_zero_measured_at": SIGMA_ZERO_PROXY}
    table = CRWTable.from_mse(grid, mse, metadata)
    if save:
        path = table.save(crw_cache_dir(cache_dir) / f"{crw_key(model, cond, height, width)}.json")
        table.metadata["path"] = str(path)
    return table
