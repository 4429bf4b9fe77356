"""Bad inputs and faults that used to pass silently or with a vague error: each runs the exact case."""

import json
import shutil

import pytest
import torch

from guidance import get_method, load_model
from guidance.loading.manifest import DamagedModelError
from guidance.backbones.default import DEFAULT_MODEL_DIR


@pytest.fixture()
def copied_model(tmp_path):
    """A copy of the default model's folder, reached by its path (not as 'default')."""
    folder = tmp_path / "my_model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    return folder


def _flip(path, count=16):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_copied_folder_with_a_manifest_is_verified_and_names_the_bad_file(copied_model):
    load_model(str(copied_model))  # intact: loads
    _flip(copied_model / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DamagedModelError, match="unet/diffusion_pytorch_model.safetensors does not match"):
        load_model(str(copied_model))


def test_damaged_local_folders_name_the_folder_and_the_part(copied_model, tmp_path):
    (copied_model / "manifest.json").unlink()  # no manifest: the loaders' own errors, made exact
    (copied_model / "unet" / "config.json").unlink()
    with pytest.raises(DamagedModelError, match=r"my_model \(component 'unet'\) is damaged or incomplete") as error:
        load_model(str(copied_model))
    assert "hf download" in str(error.value) and "Hugging Face cache" not in str(error.value)

    truncated = tmp_path / "truncated"
    shutil.copytree(DEFAULT_MODEL_DIR, truncated)
    (truncated / "manifest.json").unlink()
    weights = truncated / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DamagedModelError, match=r"truncated \(component 'vae'\) is damaged"):
        load_model(str(truncated))

    (truncated / "model_index.json").write_text("{not json")
    with pytest.raises(DamagedModelError, match="model_index.json is not valid JSON"):
        load_model(str(truncated))


def test_a_missing_folder_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for source in ("out/model", "./model", str(tmp_path / "nothing" / "here")):
        with pytest.raises(ValueError, match="no such folder"):
            load_model(source)


def test_a_generator_that_is_not_one_is_refused(tmp_path):
    model = load_model("default")
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        get_method("unguided")(model, None, num_steps=2, height=32, width=32, generator="abc")
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        get_method("unguided")(model, None, num_steps=2, height=32, width=32, generator=[torch.Generator(), 3],
                               batch_size=2)


def test_generate_refuses_a_weight_that_is_not_a_number(cli, tmp_path):
    code, _, stderr = cli("generate", "--classifier", "default", "--label", "hubble", "--weight", "nan", "--out",
                          tmp_path / "g")
    assert code == 2 and "the guidance weight (--weight) must be a finite number, got nan" in stderr
    assert "diverged" not in stderr and not (tmp_path / "g").exists()


def test_a_full_disk_names_the_file_and_leaves_no_incomplete_set(cli, photo_32, tmp_path, monkeypatch):
    """The grid write fails with ENOSPC: the error names grid.png, and restored.png / measurement.png (written
    before it) are removed, so no set without metrics.json is left; the folder made for it is removed too."""
    import errno

    import tasks.commands.restore as restore_module

    def full(path, rows, captions=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_grid(path, rows, captions=None):
        from guidance.loading.files import write_atomic

        return write_atomic(path, lambda temporary: full(temporary, rows))

    monkeypatch.setattr(restore_module, "save_grid", save_grid)
    out = tmp_path / "out"
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", "sr:factor=2", "--method", "pnp_flow",
                          "--steps", "2", "--out", out, "--quiet")
    assert code == 1 and f"could not write {out / 'grid.png'}: No space left on device" in stderr, stderr
    assert not out.exists()


def test_no_empty_output_folder_is_left_after_an_error(cli, photo_32, tmp_path):
    out = tmp_path / "new" / "folder"
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", "sr:factor=2", "--model",
                          tmp_path / "missing-model", "--out", out)
    assert code != 0 and "no such folder" in stderr
    assert not (tmp_path / "new").exists()


def test_calibrate_checks_its_cache_folder_before_computing(cli, tmp_path, monkeypatch):
    import tasks.commands.calibrate as calibrate_module

    images = tmp_path / "images"
    images.mkdir()
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setattr(calibrate_module, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, stderr = cli("calibrate", "--images", images, "--cache-dir", blocked / "crw")
    assert code == 2 and f"cannot write to the calibration cache folder {str(blocked / 'crw')!r}" in stderr
    assert "--cache-dir" in stderr and ".write-test" not in stderr


def test_an_sr_factor_the_size_does_not_fit_suggests_sizes_the_model_takes_too(cli, tmp_path):
    from tasks import save_image

    photo = save_image(torch.zeros(1, 3, 64, 64), tmp_path / "photo.png")
    code, _, stderr = cli("restore", photo, "--simulate", "--operator", "sr:factor=3", "--out", tmp_path / "r")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "factor is 3, so sides must be multiples of 48 (e.g. 48x48 or 96x96)" in stderr and "--resize" in stderr
    code, _, stderr = cli("restore", photo, "--simulate", "--operator", "sr:factor=3", "--resize", "--steps", "2",
                          "--method", "pnp_flow", "--out", tmp_path / "r", "--quiet")
    assert code == 0, stderr
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["settings"]["height"] == 48


def test_design_refuses_a_repeated_letter_a_zero_count_and_an_unwritable_out(cli, tmp_path):
    code, _, stderr = cli("design", "--score", "motif:GA", "--alphabet", "AACG")
    assert code == 2 and "the alphabet 'AACG' repeats 'A': one letter per token (--alphabet ACG)" in stderr
    code, _, stderr = cli("design", "--score", "motif:GA", "--num", "0")
    assert code == 2 and "--num" in stderr
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    code, _, stderr = cli("design", "--score", "motif:GA", "--out", blocked / "designs.json")
    assert code == 2 and f"cannot write to the folder of --out {str(blocked)!r}" in stderr
    assert ".write-test" not in stderr


# -- benchmark hygiene ----------------------------------------------------------------------------------------
def _photos(folder, names=("a.png", "b.png")):
    from tasks import save_image

    folder.mkdir()
    for i, name in enumerate(names):
        save_image(torch.full((1, 3, 32, 32), 0.1 * i), folder / name)
    return folder


def _bench(images, out, *extra):
    return ("benchmark", "--images", images, "--operators", "sr:factor=2", "--methods", "pnp_flow", "--out", out,
            "--steps", "2", "--size", "32", "--quiet", *extra)


def test_benchmark_checks_every_image_before_the_first_item(cli, tmp_path, monkeypatch):
    import tasks.commands.benchmark.run as benchmark_module

    images = _photos(tmp_path / "photos")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    monkeypatch.setattr(benchmark_module, "_run_item", lambda *a, **k: pytest.fail("an item was computed"))
    code, _, stderr = cli(*_bench(images, tmp_path / "b"))
    assert code == 2 and "the benchmark image" in stderr and "broken.png" in stderr and "cannot be read" in stderr


def test_a_bad_option_value_leaves_nothing_so_the_corrected_rerun_runs(cli, tmp_path):
    images, out = _photos(tmp_path / "photos"), tmp_path / "bench"
    code, _, stderr = cli(*_bench(images, out, "--option", "pnp_flow.step_size=abc"))
    assert code != 0 and "step_size" in stderr
    assert not out.exists()
    code, _, stderr = cli(*_bench(images, out, "--option", "pnp_flow.step_size=0.3"))
    assert code == 0, stderr


def test_stale_temporary_files_are_removed_on_resume(cli, tmp_path):
    import os
    import time

    images, out = _photos(tmp_path / "photos"), tmp_path / "bench"
    assert cli(*_bench(images, out))[0] == 0
    stale = out / "items" / ".a__sr_factor_2__pnp_flow.png.x1y2.part"
    stale.write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert cli(*_bench(images, out))[0] == 0  # the resume
    assert not stale.exists()


# -- sizes far beyond the model or the machine ------------------------------------------------------------------
def test_resize_fits_a_large_photo_to_the_models_working_size(cli, tmp_path):
    from PIL import Image

    photo = tmp_path / "large.png"
    Image.new("RGB", (4000, 3000), (120, 90, 60)).save(photo)
    out = tmp_path / "r"
    code, _, stderr = cli("restore", photo, "--simulate", "--operator", "sr:factor=2", "--resize", "--method",
                          "pnp_flow", "--steps", "2", "--out", out, "--quiet")
    assert code == 0, stderr
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert (settings["height"], settings["width"]) == (192, 256) and settings["input_size"] == [3000, 4000]


def test_a_run_far_beyond_the_free_memory_is_refused_before_it_starts(cli, tmp_path, monkeypatch):
    import guidance.memory
    import tasks.commands.restore as restore_module
    from tasks import save_image

    monkeypatch.setattr(guidance.memory, "free_memory_gib", lambda device: 2.0)
    monkeypatch.setattr(restore_module, "restore", lambda *a, **k: pytest.fail("the restoration started"))
    photo = save_image(torch.zeros(1, 3, 1024, 1024), tmp_path / "big.png")
    code, _, stderr = cli("restore", photo, "--simulate", "--operator", "sr:factor=2", "--out", tmp_path / "r")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "a 1024x1024 restoration needs about 6.3 GiB" in stderr and "2.0 GiB free here" in stderr
    assert "use at most 544x544" in stderr and "256 pixels" in stderr  # 544² x 6 GiB/MP = 1.78 <= 0.9 x 2
    assert restore_module.check_memory(load_model("default"), 256, 256) == pytest.approx(6.0 * 256 * 256 / 1e6)
