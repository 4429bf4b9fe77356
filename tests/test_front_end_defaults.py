"""Default paths as a new user tries them: each test runs the user's exact call or command."""

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tasks
from guidance import AnalyticSimplexFlow, CategoricalMixture, ClassifierObjective, get_method, load_model
from guidance.features.consistency import pixel_consistency
from operators import make_operator

ROOT = Path(__file__).resolve().parents[1]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _smooth(size=32, seed=0):
    coarse = torch.rand(1, 3, 4, 4, generator=_gen(seed)) * 1.6 - 0.8
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(-1, 1)


# -- editing needs text ---------------------------------------------------------------------------------------
def test_edit_with_the_default_model_says_it_needs_a_text_model(cli, photo_32, tmp_path):
    mask = tmp_path / "mask.png"
    tasks.save_image(torch.ones(1, 3, 32, 32), mask)
    code, _, stderr = cli("edit", photo_32, "--mask", mask, "--source-prompt", "a photo of a cat", "--edit-prompt",
                          "a photo of a dog", "--out", tmp_path / "edited")
    assert code != 0 and len(stderr.strip().splitlines()) == 1, stderr
    assert "takes no text" in stderr and "text-conditioned model" in stderr and "SD3" in stderr
    assert "guidance_scale" not in stderr and "drop --prompt" not in stderr
    assert not (tmp_path / "edited" / "edited.png").exists()


def test_edit_demo_runs_with_its_defaults(tmp_path, monkeypatch, offline_cache, capsys):
    """``python demos/edit_image.py`` with its defaults (the default model, which takes no text: the band across the
    cat's eyes is regenerated toward the classifier's "texture"), run in this process."""
    import runpy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "demos" / "edit_image.py"), "--out", str(tmp_path / "e")])
    runpy.run_path(str(ROOT / "demos" / "edit_image.py"), run_name="__main__")
    assert "inversion_edit" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["score_edited"] > metrics["score_source"]
    assert metrics["change_outside_mask"] < metrics["change_inside_mask"]


# -- simplex flows --------------------------------------------------------------------------------------------
def test_unguided_and_best_of_n_sample_simplex_flows():
    flow = AnalyticSimplexFlow(CategoricalMixture.random(3, 12, 4, generator=_gen(0)))
    out = get_method("unguided")(flow, None, num_steps=5, batch_size=4, generator=_gen(1), progress=False)
    assert out.info["tokens"].shape == (4, 12) and out.nfe == 5 and out.image is None
    assert torch.allclose(out.x.sum(-1), torch.ones(4, 12, dtype=out.x.dtype))
    again = get_method("unguided")(flow, None, num_steps=5, batch_size=4, generator=_gen(1), progress=False)
    assert torch.equal(again.info["tokens"], out.info["tokens"])
    scores = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    best = get_method("best_of_n", candidates=3)(flow, ClassifierObjective(scores, label=1, space="latent"),
                                                 num_steps=5, batch_size=2, generator=_gen(2), progress=False)
    assert best.info["tokens"].shape == (2, 12) and best.info["loss"].shape == (2, 3)
    with pytest.raises(ValueError, match="height"):
        get_method("unguided")(flow, None, num_steps=5, height=32, progress=False)


# -- restore: recommendations that cannot apply, the callable task, consistency -------------------------------
def test_a_nonlinear_operator_says_it_skips_the_recommended_consistency():
    model = load_model("default")
    with pytest.warns(UserWarning, match="recommends 100 pixel-consistency steps, but 'jpeg:quality=50' is not"):
        out = tasks.restore(model, _smooth(), "jpeg:quality=50", "flowchef", simulate=True, num_steps=2,
                            progress=False)
    assert out.settings["consistency_steps"] == 0 and "not linear" in out.settings["consistency_skipped"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for none: nothing to say
        quiet = tasks.restore(model, _smooth(), "jpeg:quality=50", "flowchef", simulate=True, num_steps=2,
                              progress=False, consistency_steps=0)
    assert "consistency_skipped" not in quiet.settings


def test_restore_command_warns_in_one_line_for_a_nonlinear_operator(cli, photo_32, tmp_path):
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", "jpeg:quality=50", "--method",
                          "flowchef", "--steps", "2", "--out", tmp_path / "r", "--quiet")
    assert code == 0, stderr
    assert "flowsteer: warning: the model recommends 100 pixel-consistency steps" in stderr


def test_every_command_is_a_function_in_tasks():
    for name, (module, function) in tasks.COMMANDS.items():
        assert getattr(tasks, name) is getattr(importlib.import_module(module), function), name
    out = tasks.restore(load_model("default"), _smooth(), "sr:factor=2", "pnp_flow", simulate=True, num_steps=2,
                        progress=False)
    assert out.restored.shape == (1, 3, 32, 32)
    from tasks.commands.restore import restore  # the command module's own function

    assert tasks.restore is restore
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        tasks.nosuch  # noqa: B018


def test_pixel_consistency_returns_an_image_as_the_readme_shows():
    op = make_operator("sr:factor=2", noise_std=0.01)
    x = _smooth()
    y = op.measure(x, _gen(3))
    out = pixel_consistency(torch.zeros_like(x), op, y, max_steps=20)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    assert (op(out) - y).norm() < (op(torch.zeros_like(x)) - y).norm()
    same, steps = pixel_consistency(torch.zeros_like(x), op, y, max_steps=20, return_steps=True)
    assert torch.equal(same, out) and steps.shape == (1,) and 0 < int(steps[0]) <= 20


# -- devices and dtypes ---------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.backends.cuda.is_built() and torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_so_and_how_to_choose_the_cpu(cli, photo_32, tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda': there is no CUDA device here .*use device='cpu'"):
        load_model("default", device="cuda")
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", "sr:factor=2", "--device", "cuda",
                          "--out", tmp_path / "r")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--device cpu" in stderr, stderr


def test_bad_devices_dtypes_and_sources_are_refused_in_one_line():
    with pytest.raises(ValueError, match="'nosuch' is not a device name"):
        load_model("default", device="nosuch")
    with pytest.raises(ValueError, match="dtype 'float33' is not a floating dtype"):
        load_model("default", dtype="float33")
    with pytest.raises(ValueError, match="the model source is empty"):
        load_model("")
    with pytest.raises(ValueError, match="disagree"):
        load_model("default", dtype=torch.float32, torch_dtype=torch.bfloat16)
    model = load_model("default", torch_dtype="bf16")  # diffusers' name for it, and a dtype by name
    assert model.dtype == torch.bfloat16
