"""Shared fixtures: tiny text-conditioned backbones built once per test session."""

import pytest
from tiny_models import flux_pipeline, sd3_pipeline

from guidance.models.flux import FluxModel
from guidance.models.sd3 import SD3Model


@pytest.fixture(scope="session")
def sd3():
    return SD3Model(sd3_pipeline())


@pytest.fixture(scope="session")
def flux():
    return FluxModel(flux_pipeline(dev=True))


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory):
    """A tiny SD3 pipeline saved with save_pretrained: a real `--model FOLDER` for command-line tests (32x32)."""
    folder = tmp_path_factory.mktemp("tiny_sd3")
    sd3_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture()
def photo_32(tmp_path):
    """A smooth 32x32 RGB test photo written as PNG."""
    import torch

    from tasks.image_io import save_image

    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    image = torch.stack([x, y, (x * y)], 0)[None] * 0.8
    return save_image(image, tmp_path / "photo.png")


@pytest.fixture()
def offline_cache(monkeypatch, tmp_path):
    """No hub access, a private flowsteer cache and the installed default model, for command-line tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWSTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLOWSTEER_DEFAULT_MODEL", raising=False)


@pytest.fixture()
def cli(capsys, offline_cache):
    """Run `flowsteer ARGS...` in-process: ``cli(*args) -> (exit code, stdout, stderr)``."""
    from tasks.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
