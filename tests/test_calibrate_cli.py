"""`flowsteer calibrate` through the real command line, on a tiny SD3 folder."""

import pytest
import torch

from guidance import load_crw, load_model
from tasks.outputs.image_io import save_image


pytestmark = pytest.mark.usefixtures("offline_cache")


def test_calibrate_writes_a_table_that_restore_finds(tiny_sd3_folder, photo_32, tmp_path, cli):
    images = tmp_path / "images"
    images.mkdir()
    photo_32.rename(images / "a.png")
    save_image(torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1, images / "b.jpg")
    (images / "notes.txt").write_text("ignored")
    code, out, err = cli("calibrate", "--model", tiny_sd3_folder, "--images", images, "--size", 32,
                         "--points", 4, "--cache-dir", tmp_path / "crw", "--quiet", "--device", "cpu")
    assert code == 0, err
    assert "2 images at 32x32, 4 points" in out and f"wrote {tmp_path / 'crw'}" in out
    model = load_model(tiny_sd3_folder)
    table = load_crw(model, model.condition(), 32, 32, cache_dir=tmp_path / "crw")
    assert table is not None and len(table) == 4 and table.metadata["num_images"] == 2
    assert abs(float(table.weights.mean()) - 0.5) < 1e-6

    code, _, err = cli("restore", images / "a.png", "--operator", "sr:factor=2", "--model", tiny_sd3_folder,
                       "--simulate", "--steps", 2, "--out", tmp_path / "out", "--quiet", "--device", "cpu",
                       "--option", f"crw_cache_dir={tmp_path / 'crw'}", "--option", "data_steps=2")
    assert code == 0, err
    assert "calibrated regularization weights" not in err  # FLAIR found the table: no default-table warning


def test_calibrate_takes_height_and_width(tiny_sd3_folder, photo_32, tmp_path, cli):
    """--size H W: the images are resized to cover H x W and centre-cropped; the table is keyed by H x W."""
    images = tmp_path / "images"
    images.mkdir()
    photo_32.rename(images / "a.png")
    code, out, err = cli("calibrate", "--model", tiny_sd3_folder, "--images", images, "--size", 24, 40,
                         "--points", 2, "--cache-dir", tmp_path / "crw", "--quiet", "--device", "cpu")
    assert code == 0, err
    assert "1 images at 24x40, 2 points" in out
    model = load_model(tiny_sd3_folder)
    assert load_crw(model, model.condition(), 24, 40, cache_dir=tmp_path / "crw").metadata["width"] == 40


def test_calibrate_bad_folder_and_size(tiny_sd3_folder, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    for args, needles in ((["--images", tmp_path / "empty", "--size", 32], ("holds no PNG or JPEG",)),
                          (["--images", tmp_path / "none"], ("does not exist", "--images")),
                          (["--images", tmp_path / "empty", "--size", 30], ("--size 30", "multiples of 8",
                                                                             "use --size 32")),
                          (["--images", tmp_path / "empty", "--size", 30, 40], ("--size 30 40", "use --size 32 40")),
                          (["--images", tmp_path / "empty", "--size", 8, 8, 8], ("--size takes one number",))):
        code, _, err = cli("calibrate", "--model", tiny_sd3_folder, *args, "--quiet", "--device", "cpu")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert all(needle in lines[0] for needle in needles), lines[0]
