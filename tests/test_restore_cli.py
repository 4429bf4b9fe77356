"""`flowsteer restore` through the real command line, on a tiny SD3 folder (32x32, 2 steps)."""

import json
from pathlib import Path

import pytest
import torch

import tasks.commands.restore
from guidance.loading.files import write_atomic
from operators import make_operator
from tasks.commands.cli import main
from tasks.outputs.image_io import load_image, save_image

FILES = ["grid.png", "measurement.png", "metrics.json", "restored.png"]
pytestmark = pytest.mark.usefixtures("offline_cache")


def restore(cli, *args):
    return cli("restore", *args, "--quiet", "--device", "cpu")  # the same bytes on any machine


def assert_error(code, err, *needles):
    """A non-zero exit and one line on stderr naming the problem (and the fix), no traceback."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowsteer: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- happy paths -------------------------------------------------------------------------------------------
def test_simulate_writes_outputs_and_is_reproducible(cli, tiny_sd3_folder, photo_32, tmp_path):
    runs = []
    for name in ("a", "b"):
        code, out, err = restore(cli, photo_32, "--operator", "sr:factor=2", "--method", "flair", "--model",
                                 tiny_sd3_folder, "--simulate", "--steps", 2, "--seed", 3, "--out", tmp_path / name,
                                 "--option", "data_steps=3")
        assert code == 0, err
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == FILES
        runs.append((tmp_path / name / "restored.png").read_bytes())
    assert runs[0] == runs[1]
    assert "PSNR" in out and "wrote" in out
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert isinstance(metrics["psnr"], float) and isinstance(metrics["ssim"], float)
    assert isinstance(metrics["lpips"], float) or metrics["lpips"].startswith("unavailable: ")
    assert metrics["seconds"] > 0 and metrics["peak_memory_gib"] > 0 and metrics["nfe"] == 2
    settings = metrics["settings"]
    assert settings["model"] == str(tiny_sd3_folder) and settings["operator"] == "sr:factor=2"
    assert settings["method"] == "flair" and "data_steps" in settings["options"]
    assert (settings["seed"], settings["num_steps"], settings["input"]) == (3, 2, str(photo_32))
    assert load_image(tmp_path / "a" / "measurement.png").shape[-2:] == (16, 16)


def test_measured_input_with_reference_and_options(cli, tiny_sd3_folder, photo_32, tmp_path):
    y = make_operator("sr:factor=2")(load_image(photo_32))
    measured = save_image(y, tmp_path / "low.png")
    code, _, err = restore(cli, measured, "--operator", "sr:factor=2", "--method", "flowchef", "--model",
                             tiny_sd3_folder, "--reference", photo_32, "--steps", 2, "--out", tmp_path / "out",
                             "--option", "step_size=0.3", "--option", "window=(0,1)")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert isinstance(metrics["psnr"], float) and metrics["settings"]["reference"] == str(photo_32)
    assert metrics["settings"]["options"]["step_size"] == 0.3 and metrics["settings"]["options"]["window"] == [0, 1]
    assert load_image(tmp_path / "out" / "restored.png").shape[-2:] == (32, 32)


# -- bad input, one test each ------------------------------------------------------------------------------
def test_missing_input(cli, tmp_path):
    code, _, err = restore(cli, tmp_path / "nothere.png", "--operator", "sr", "--out", tmp_path / "out")
    assert_error(code, err, "nothere.png", "does not exist", "check the path")


def test_unreadable_input(cli, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    code, _, err = restore(cli, tmp_path / "x.png", "--operator", "sr", "--out", tmp_path / "out")
    assert_error(code, err, "cannot read", "x.png", "PNG or JPEG")


def test_mask_of_another_size(cli, tiny_sd3_folder, photo_32, tmp_path):
    hole = torch.ones(1, 1, 16, 16)
    hole[..., :4, :] = -1  # white (missing) below, black (kept) on top: not all or nothing
    mask = save_image(hole, tmp_path / "mask.png")
    code, _, err = restore(cli, photo_32, "--operator", f"inpaint_mask:path={mask}", "--model", tiny_sd3_folder,
                           "--simulate", "--out", tmp_path / "out")
    assert_error(code, err, "inpaint_mask", "(16, 16)", "(32, 32)", "resize the mask")


def test_unknown_operator(cli, photo_32, tmp_path):
    code, _, err = restore(cli, photo_32, "--operator", "gausian_blur", "--out", tmp_path / "out")
    assert_error(code, err, "unknown operator 'gausian_blur'", "did you mean 'gaussian_blur'")


def test_unknown_method(cli, photo_32, tmp_path):
    code, _, err = restore(cli, photo_32, "--operator", "sr", "--method", "flare", "--out", tmp_path / "out")
    assert_error(code, err, "unknown method 'flare'", "did you mean 'flair'")


def test_unknown_model(cli, photo_32, tmp_path):
    code, _, err = restore(cli, photo_32, "--operator", "sr", "--simulate", "--model", tmp_path / "no_model",
                           "--out", tmp_path / "a")
    assert_error(code, err, "no such folder", "save_pretrained")
    code, _, err = restore(cli, photo_32, "--operator", "sr", "--simulate", "--model",
                           "stabilityai/stable-diffusion-3.5-medum", "--out", tmp_path / "b")
    assert_error(code, err, "offline", "hf download", "did you mean 'stabilityai/stable-diffusion-3.5-medium'")


def test_unwritable_output_folder(cli, photo_32, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = restore(cli, photo_32, "--operator", "sr", "--simulate", "--out", blocker / "out")
    assert_error(code, err, "cannot write to the output folder", "choose another --out")


def test_existing_output_needs_overwrite(cli, tiny_sd3_folder, photo_32, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "restored.png").write_bytes(b"keep")
    args = (photo_32, "--operator", "sr:factor=2", "--method", "flowchef", "--model", tiny_sd3_folder, "--simulate",
            "--steps", 2, "--out", tmp_path / "out")
    code, _, err = restore(cli, *args)
    assert_error(code, err, "already exists", "--overwrite")
    assert (tmp_path / "out" / "restored.png").read_bytes() == b"keep"
    code, _, err = restore(cli, *args, "--overwrite")
    assert code == 0, err
    assert (tmp_path / "out" / "restored.png").read_bytes() != b"keep"


def test_divergence_is_one_line(cli, tiny_sd3_folder, photo_32, tmp_path):
    code, _, err = restore(cli, photo_32, "--operator", "sr:factor=2", "--method", "flowchef", "--model",
                           tiny_sd3_folder, "--simulate", "--steps", 3, "--option", "step_size=1e30",
                           "--out", tmp_path / "out")
    assert_error(code, err, "diverged", "at step", "smaller step_size", "--option")
    assert not (tmp_path / "out" / "restored.png").exists()


def test_size_not_fitting_the_model_and_resize(cli, tiny_sd3_folder, tmp_path):
    odd = save_image(torch.rand(1, 3, 36, 44, generator=torch.Generator().manual_seed(0)) * 2 - 1, tmp_path / "o.png")
    args = (odd, "--operator", "sr:factor=2", "--method", "flowchef", "--model", tiny_sd3_folder, "--simulate",
            "--steps", 2, "--out", tmp_path / "out")
    code, _, err = restore(cli, *args)
    assert_error(code, err, "36x44", "multiples of 8", "--resize", "40x48")
    code, _, err = restore(cli, *args, "--resize")
    assert code == 0, err
    assert load_image(tmp_path / "out" / "restored.png").shape[-2:] == (40, 48)


def test_ctrl_c_leaves_no_partial_file(cli, monkeypatch, tiny_sd3_folder, photo_32, tmp_path):
    def interrupted_grid(path, rows, captions=None):
        def write(temporary):
            Path(temporary).write_bytes(b"half a PNG")
            raise KeyboardInterrupt
        write_atomic(path, write)

    monkeypatch.setattr(tasks.commands.restore, "save_grid", interrupted_grid)
    code, _, err = restore(cli, photo_32, "--operator", "sr:factor=2", "--method", "flowchef", "--model",
                           tiny_sd3_folder, "--simulate", "--steps", 2, "--out", tmp_path / "out")
    assert code == 130 and "interrupted" in err
    # the set stopped half-way is removed whole (no restored.png without its metrics.json), and so is the folder
    # made for it
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "restore", str(tmp_path / "nothere.png"), "--operator", "sr", "--out", str(tmp_path / "o")])
