"""Inputs checked where they enter, and result sets written whole or not at all: each test runs the issue's example
as a user would (the command line, the console entry in a subprocess, or the Python API) and checks the one line
that names the value, the problem and the fix, and that nothing is left in --out."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch

from guidance import load_model
from guidance.backbones.default import DEFAULT_MODEL_DIR
from guidance.loading.manifest import DamagedModelError, sha256, write_manifest

GENERATE = ("generate", "--classifier", "default", "--label", "hubble", "--steps", "2", "--size", "32", "32",
            "--quiet")


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture()
def copied_model(tmp_path):
    """A copy of the default model's folder, reached by its path, without its manifest.json."""
    folder = tmp_path / "my_model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    (folder / "manifest.json").unlink()
    return folder


# -- 1. devices flowsteer cannot run on ------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ("generate", "--classifier", "default", "--label", "hubble"),
    ("restore", "PHOTO", "--simulate", "--operator", "sr:factor=2"),
    ("edit", "PHOTO", "--mask", "PHOTO", "--source-prompt", "a cat", "--edit-prompt", "a dog"),
    ("calibrate", "--images", "FOLDER", "--points", "4"),
    ("benchmark", "--images", "FOLDER", "--operators", "sr:factor=2", "--methods", "pnp_flow"),
])
def test_a_meta_device_is_refused_by_every_command_before_anything_loads(cli, photo_32, tmp_path, monkeypatch,
                                                                         command):
    import guidance.loading.models

    monkeypatch.setattr(guidance.loading.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setenv("FLOWSTEER_CACHE", str(tmp_path / "cache"))
    folder = photo_32.parent
    command = [folder if a == "FOLDER" else photo_32 if a == "PHOTO" else a for a in command]
    out = tmp_path / "out"
    extra = () if command[0] == "calibrate" else ("--out", out)
    code, _, stderr = cli(*command, "--device", "meta", *extra)
    line = one_line(stderr)
    assert code == 2 and "device 'meta'" in line and "--device cpu" in line, line
    assert "Cannot copy out of meta tensor" not in line and not out.exists()


def test_devices_of_other_types_are_refused_by_the_api_in_one_line():
    from guidance.loading.devices import check_device

    for name in ("meta", "xpu", "hpu:0"):
        with pytest.raises(ValueError, match=rf"device '{name}': flowsteer runs on 'cpu', 'cuda' .* use device='cpu'"):
            check_device(name)
    with pytest.raises(ValueError, match="device 'meta'"):
        load_model("default", device="meta")
    assert check_device("cpu") == torch.device("cpu")


def test_generate_on_cuda_without_a_gpu_says_so_before_anything_loads(cli, tmp_path, monkeypatch):
    import tasks.commands.generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(tasks.commands.generate, "make_guide", lambda *a, **k: pytest.fail("the classifier was loaded"))
    out = tmp_path / "g"
    code, _, stderr = cli(*GENERATE, "--device", "cuda", "--out", out)
    line = one_line(stderr)
    assert code == 2 and "device 'cuda': there is no CUDA device here" in line and "--device cpu" in line
    assert "NVIDIA driver" not in line and not out.exists()


# -- 2. images: decompression bombs, empty images, values far out of range ------------------------------------
def _png_header(path, width, height):
    """A PNG whose header declares width x height RGB pixels (its data is one empty row: PIL refuses or warns on
    the header alone, before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_with_the_file_the_pixel_count_and_a_fix(cli, tmp_path):
    bomb = _png_header(tmp_path / "bomb.png", 30000, 30000)
    out = tmp_path / "r"
    code, _, stderr = cli("restore", bomb, "--simulate", "--operator", "sr:factor=2", "--out", out)
    line = one_line(stderr)
    assert code == 2 and "bomb.png" in line and "900,000,000 pixels" in line and "resize it" in line, line
    assert "must be an image file" not in line  # it is one: too large is its own problem, with its own fix
    assert not out.exists()

    from tasks import load_image

    large = _png_header(tmp_path / "large.png", 10000, 10000)  # above PIL's warning limit, below its error limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"'.*large.png' declares 100,000,000 pixels, more than the "
                                             r"89,478,485 read safely.*MAX_IMAGE_PIXELS"):
            load_image(large)


def test_a_mask_file_bomb_is_refused_with_its_name(cli, photo_32, tmp_path):
    from operators import make_operator

    for side in (30000, 10000):  # above PIL's error limit, and between its warning and error limits
        bomb = _png_header(tmp_path / f"mask{side}.png", side, side)
        with pytest.raises(ValueError, match=rf"the mask file '.*mask{side}.png' is too large to open safely "
                                             rf"\(Image size \({side * side} pixels\) exceeds limit"):
            make_operator(f"inpaint_mask:path={bomb}")
    out = tmp_path / "r"
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", f"inpaint_mask:path={bomb}", "--out", out)
    line = one_line(stderr)
    assert code == 2 and "mask10000.png" in line and "too large to open safely" in line and not out.exists(), line


def test_a_benchmark_folder_with_a_bomb_names_it_before_any_work(cli, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    from tasks import save_image

    save_image(torch.zeros(1, 3, 32, 32), images / "a.png")
    _png_header(images / "b.png", 30000, 30000)
    out = tmp_path / "bench"
    code, _, stderr = cli("benchmark", "--images", images, "--operators", "sr:factor=2", "--methods", "pnp_flow",
                          "--out", out, "--steps", "2", "--size", "32", "--quiet")
    line = one_line(stderr)
    assert code == 2 and "benchmark image" in line and "b.png" in line and "900,000,000 pixels" in line, line
    assert not out.exists()


@pytest.mark.parametrize("empty", [np.zeros((0, 0, 3)), np.zeros((0, 0, 3), np.uint8), np.zeros((4, 0)),
                                   torch.zeros(3, 0, 0), torch.zeros(1, 3, 0, 8), torch.zeros(0, 3, 8, 8),
                                   torch.zeros(3, 0, 0, dtype=torch.uint8), torch.zeros(0)])
def test_an_empty_image_is_refused_in_one_line(empty):
    from guidance.loading.images import image_tensor
    from tasks import load_image

    for take in (load_image, image_tensor):
        with pytest.raises(ValueError, match=r"is empty \(shape .*no pixels\); pass an image of at least 1x1"):
            take(empty)


def test_an_empty_pil_image_is_refused():
    from PIL import Image

    from tasks import load_image

    with pytest.raises(ValueError, match=r"the PIL image is empty \(0x0 pixels\)"):
        load_image(Image.new("RGB", (0, 0)))


def test_images_far_outside_the_accepted_range_are_refused_naming_both_ranges():
    from tasks import load_image

    with pytest.raises(ValueError, match=r"taken in \[-1, 1\].*got values in \[0, 200\]; map \[0, 255\] images "
                                         r"with x / 127.5 - 1 \(or pass them as uint8\)"):
        load_image(torch.full((1, 3, 8, 8), 200.0).index_fill_(3, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match=r"taken in \[0, 1\].*got values in \[0, 200\]"):
        load_image(np.full((8, 8, 3), 200.0).clip(0, 200) * np.eye(8)[..., None])
    assert load_image(np.full((8, 8, 3), 200, np.uint8)).max() <= 1  # uint8 0..255 is the documented form
    assert load_image(torch.full((3, 8, 8), 1.0005)).max() == 1  # within the tolerance: clipped


# -- 3. weights damaged in a folder without a manifest ---------------------------------------------------------
def test_non_finite_weights_are_refused_on_loading_naming_the_component_and_the_file(cli, copied_model, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = copied_model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(DamagedModelError, match=rf"component 'unet' are damaged: {weights} holds NaN or infinite "
                                                rf"values \(in {name}\); restore the file"):
        load_model(str(copied_model))

    out = tmp_path / "g"
    code, _, stderr = cli(*GENERATE, "--model", copied_model, "--out", out)
    line = one_line(stderr)
    assert code == 2 and "unet/diffusion_pytorch_model.safetensors holds NaN" in line and "diverge" not in line
    assert not out.exists()


# -- 4. manifest entries confined to the model folder ----------------------------------------------------------
def test_a_manifest_entry_outside_the_model_folder_is_refused(copied_model, tmp_path, monkeypatch):
    import guidance.loading.manifest

    secret = tmp_path / "secret.txt"
    secret.write_text("not a weight file of this model")
    for entry in ("../secret.txt", str(secret), "unet/../../secret.txt"):
        write_manifest(copied_model)
        manifest = json.loads((copied_model / "manifest.json").read_text())
        manifest["sha256"][entry] = sha256(secret)  # matches: only the confinement can refuse it
        (copied_model / "manifest.json").write_text(json.dumps(manifest))
        read = []
        monkeypatch.setattr(guidance.loading.manifest, "sha256", lambda path: read.append(str(path)) or "0")
        with pytest.raises(DamagedModelError, match=rf"its entry {entry!r} is not a path inside the folder"):
            load_model(str(copied_model))
        assert read == []  # refused before any file was read
        monkeypatch.undo()


# -- 5. an unknown pipeline class loads through the generic adapter, said so ----------------------------------
def test_an_unknown_class_name_is_loaded_generically_with_one_warning(copied_model):
    index = json.loads((copied_model / "model_index.json").read_text())
    del index["flowsteer"]
    index["_class_name"] = "MyFlowPipeline"
    (copied_model / "model_index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match=r"'MyFlowPipeline' of .* is not one flowsteer knows; its unet, vae and "
                                         r"scheduler are loaded with the generic adapter .*\"flowsteer\": \{\}"):
        load_model(str(copied_model))
    index["flowsteer"] = {}  # the fix the warning names
    (copied_model / "model_index.json").write_text(json.dumps(index))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(str(copied_model))
    assert not [w for w in caught if "generic adapter" in str(w.message)]


# -- 6. Ctrl-C during start-up ------------------------------------------------------------------------------
def _environment():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_importing_the_console_entry_imports_no_heavy_library():
    code = ("import sys, tasks.commands.cli; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_environment(),
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_ctrl_c_while_torch_loads_at_start_up_prints_one_line_and_exits_130():
    """A real SIGINT, sent by the process to itself the moment `flowsteer operators` starts importing its first
    heavy module (torch, or flowsteer's own packages when something imported torch already), in a process that
    runs the console entry as its script does."""
    code = (
        "import os, signal, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('torch', 'operators', 'guidance'):\n"
        "            sys.meta_path.remove(self)\n"
        "            signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['flowsteer', 'operators']\n"
        "from tasks.commands.cli import main\n"
        "sys.exit(main())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_environment(),
                          timeout=120)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert one_line(done.stderr).startswith("flowsteer: interrupted") and done.stdout == ""
    assert done.returncode != -signal.SIGINT


def test_ctrl_c_while_the_command_modules_import_is_one_line(capsys, monkeypatch):
    import tasks.commands.cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks.commands.cli, "import_module", interrupted)
    try:
        code = tasks.commands.cli.main(["operators"])
    except KeyboardInterrupt:  # not re-raised: it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped tasks.commands.cli.main during start-up")
    assert code == 130
    assert one_line(capsys.readouterr().err) == ("flowsteer: interrupted; finished results are kept, no partial "
                                                 "file or result was written")


# -- 7. a result set appears whole or not at all ---------------------------------------------------------------
def _full_disk(module, monkeypatch):
    """The grid write (after the images, before metrics.json) fails as on a full disk."""
    from guidance.loading.files import write_atomic

    def full(temporary):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "save_grid", lambda path, *a, **k: write_atomic(path, full))


def test_generate_on_a_full_disk_leaves_no_sample_without_its_metrics(cli, tmp_path, monkeypatch):
    import tasks.commands.generate

    _full_disk(tasks.commands.generate, monkeypatch)
    out = tmp_path / "g"
    code, _, stderr = cli(*GENERATE, "--num", "2", "--out", out)
    line = one_line(stderr)
    assert code == 1 and f"could not write {out / 'grid.png'}: No space left on device" in line, line
    assert ".flowsteer-set" not in line and not out.exists()


def test_a_failed_overwrite_keeps_the_earlier_set_whole(cli, tmp_path, monkeypatch):
    import tasks.commands.generate

    out = tmp_path / "g"
    assert cli(*GENERATE, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _full_disk(tasks.commands.generate, monkeypatch)
    code, _, stderr = cli(*GENERATE, "--seed", "7", "--overwrite", "--out", out)
    assert code == 1 and "grid.png" in one_line(stderr)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the set of seed 0, untouched


def test_edit_writes_its_set_whole_or_not_at_all(tmp_path, monkeypatch):
    import tasks.commands.edit

    image = torch.zeros(1, 3, 8, 8)
    result = tasks.commands.edit.Edit(edited=image, source=image, mask=torch.ones(1, 1, 8, 8), metrics={}, settings={})
    _full_disk(tasks.commands.edit, monkeypatch)
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'grid.png'}: No space left on device"):
        tasks.commands.edit.save_edit(result, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    tasks.commands.edit.save_edit(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.png", "grid.png", "metrics.json"]


def test_an_interrupted_set_leaves_nothing_and_replaces_nothing(tmp_path):
    from guidance.loading.files import write_text_atomic
    from tasks.outputs.folders import write_outputs

    def interrupt(path):
        raise KeyboardInterrupt

    (tmp_path / "a.txt").write_text("the earlier result")
    with pytest.raises(KeyboardInterrupt):
        write_outputs([(tmp_path / "a.txt", lambda p: write_text_atomic(p, "a")), (tmp_path / "b.txt", interrupt),
                       (tmp_path / "metrics.json", lambda p: write_text_atomic(p, "{}"))])
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "the earlier result"
