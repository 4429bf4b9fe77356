"""Shared fixtures: tiny text-conditioned backbones built once per test session, and the device of the CUDA tests."""

import os

import pytest
import torch
from tiny_models import flux_pipeline, sd3_pipeline

from guidance.backbones.flux import FluxModel
from guidance.backbones.sd3 import SD3Model


#: Set to a device name (``cpu``) to run the CUDA tests there: the GPU kit's dry run does, to check them without a GPU.
CUDA_TESTS_DEVICE = "FLOWSTEER_CUDA_TESTS_DEVICE"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (skipped without one); every test that takes the "
                                       "cuda_device fixture has it, and the GPU kit selects exactly these (-m cuda)")


def pytest_collection_modifyitems(config, items):
    """The ``cuda`` marker follows from the ``cuda_device`` fixture, so no GPU test can go unmarked."""
    for item in items:
        if "cuda_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """The GPU of the CUDA tests; skipped without one, unless FLOWSTEER_CUDA_TESTS_DEVICE names another device."""
    forced = os.environ.get(CUDA_TESTS_DEVICE)
    if forced:
        return torch.device(forced)
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the GPU kit, scripts/gpu_check.sh, runs these)")
    return torch.device("cuda")


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

    from tasks.outputs.image_io import save_image

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
    from tasks.commands.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of thousands of tiny ops (the parity tests): the thread pool's synchronisation
    would cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
