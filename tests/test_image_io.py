"""Image loading rules and atomic saving."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.outputs.image_io as image_io
from tasks import load_image, save_image


def test_png_round_trip_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    x = load_image(tmp_path / "in.png")
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    save_image(x, tmp_path / "out.png")
    assert np.array_equal(np.array(Image.open(tmp_path / "out.png")), pixels)


def test_grayscale_is_replicated_and_colour_reduces_to_luma():
    gray = Image.fromarray(np.array([[0, 255], [51, 102]], dtype=np.uint8), mode="L")
    x = load_image(gray)
    assert x.shape == (1, 3, 2, 2)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert x[0, 0, 0, 1] == 1 and x[0, 0, 0, 0] == -1
    colour = Image.fromarray(np.array([[[255, 0, 0]]], dtype=np.uint8))
    assert load_image(colour, channels=1).item() == pytest.approx(0.299 * 2 - 1, abs=1e-6)


def test_transparency_is_composited_over_white():
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[0, 1] = (0, 0, 0, 255)  # opaque black stays black
    x = load_image(Image.fromarray(rgba, mode="RGBA"))
    torch.testing.assert_close(x[0, :, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[0, :, 0, 1], -torch.ones(3))
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    x = load_image(palette)
    torch.testing.assert_close(x[0, :, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[0, :, 0, 1], torch.tensor([1.0, -1.0, -1.0]))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # top-left white in the stored pixels
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=100, subsampling=0)
    x = load_image(tmp_path / "rotated.jpg")
    assert x.shape == (1, 3, 3, 2)  # width and height swapped
    assert x[0, 0, 0, 1] > 0.5  # the white corner is now top-right
    assert x[0, 0, 0, 0] < -0.5


def test_sixteen_bit_images_are_scaled_by_65535(tmp_path):
    pixels = np.array([[0, 65535], [32768, 16384]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    x = load_image(tmp_path / "deep.png")
    torch.testing.assert_close(x[0, 0], torch.tensor(pixels / 65535 * 2 - 1, dtype=torch.float32))


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")

    def broken_save(self, fp, format=None, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.zeros(1, 3, 4, 4), target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.png"]


def test_bad_images_are_refused_before_writing(tmp_path):
    nan = torch.zeros(1, 3, 4, 4)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_image(nan, tmp_path / "nan.png")
    with pytest.raises(ValueError, match="batch of 2"):  # one PIL image is one image (save_image takes batches)
        image_io.to_pil(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_image(torch.zeros(1, 3, 4, 4), tmp_path / "out.xyz")
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(tmp_path / "text.png")
    assert sorted(os.listdir(tmp_path)) == ["text.png"]


def test_values_outside_the_range_are_clipped_on_save(tmp_path):
    x = torch.tensor([-3.0, 0.0, 3.0]).reshape(1, 1, 1, 3)
    save_image(x, tmp_path / "clip.png")
    assert np.array(Image.open(tmp_path / "clip.png")).tolist() == [[0, 128, 255]]
    assert image_io.to_pil(x).mode == "L"
