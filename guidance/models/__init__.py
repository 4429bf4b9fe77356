"""The former import paths of flowsteer's models, before they were split by kind into ``guidance.backbones``,
``guidance.analytic``, ``guidance.sequences`` and ``tasks``, kept as aliases: ``import guidance.models.sd3`` gives
the module ``guidance.backbones.sd3`` itself (the same object, imported on first use only). New code imports the
new paths; nothing in flowsteer imports this package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: former submodule -> the module it now is
MOVED = {
    "base": "guidance.backbones.base",
    "pipeline_model": "guidance.backbones.pipeline",
    "autoencoder": "guidance.backbones.autoencoder",
    "sd3": "guidance.backbones.sd3",
    "flux": "guidance.backbones.flux",
    "generic": "guidance.backbones.generic",
    "default": "guidance.backbones.default",
    "analytic": "guidance.analytic.gaussian_mixture",
    "analytic_simplex": "guidance.analytic.categorical",
    "simplex": "guidance.sequences.simplex",
    "simplex_network": "guidance.sequences.network",
    "random_backbones": "tasks.random_backbones",
    "train_default": "tasks.train_default",
}


class _FormerPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``guidance.models.<former>`` and loads it as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module):  # the module it moved to is already executed
        pass


if not any(isinstance(finder, _FormerPaths) for finder in sys.meta_path):
    sys.meta_path.insert(0, _FormerPaths())
