"""Bad operator input: empty pipe stages, repeated spec keys, masks that mark all or no pixels, bad mask files."""

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from operators import Inpainting, make_operator, parse_spec

EVERY = "the mask marks every pixel missing: nothing is measured"
NONE = "the mask marks no pixel missing: the operator is the identity"


# -- spec strings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, where", [("sr:factor=2 |", "after"), ("| sr:factor=2", "before"), ("|", "before"),
                                         ("sr:factor=2 || gaussian_blur", "after")])
def test_empty_stage_in_a_piped_spec(spec, where):
    with pytest.raises(ValueError, match=re.escape(f"empty stage {where} '|' in the operator spec {spec!r}")):
        make_operator(spec)


def test_a_piped_spec_with_spaces_still_builds():
    op = make_operator(" gaussian_blur:kernel_size=5,sigma=1.0 |sr:factor=2 ")
    assert op(torch.rand(1, 3, 16, 16)).shape == (1, 3, 8, 8)


def test_repeated_key_in_one_stage():
    with pytest.raises(ValueError, match=re.escape("factor is given twice in the operator spec 'sr:factor=2,factor=4'")):
        make_operator("sr:factor=2,factor=4")


def test_repeated_key_in_a_piped_stage():
    with pytest.raises(ValueError, match="sigma is given twice"):
        make_operator("sr:factor=2 | gaussian_blur:sigma=1.0,sigma=2.0")


def test_keys_in_brackets_are_not_repeats():
    assert parse_spec("box:size=(8,16),top=2") == ("box", {"size": (8, 16), "top": 2})


# -- masks that mark every pixel or none -------------------------------------------------------------------
def _one_warning(record, text):
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and messages[0].startswith(text) and "\n" not in messages[0], messages


@pytest.mark.parametrize("value, text", [(1.0, EVERY), (0.0, NONE)])
def test_tensor_mask_of_all_or_nothing_warns_once_when_given(value, text):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        op = Inpainting(mask=torch.full((8, 8), value))
        _one_warning(record, text)
        x = torch.rand(1, 3, 8, 8)
        op(x), op(x), op.adjoint(x)
        _one_warning(record, text)  # not again on a forward call
    assert "a tensor mask" in str(record[0].message)


def test_a_mixed_or_soft_mask_does_not_warn():
    mask = torch.zeros(8, 8)
    mask[:2] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Inpainting(mask)(torch.rand(1, 3, 8, 8))
        Inpainting(torch.full((8, 8), 0.5))(torch.rand(1, 3, 8, 8))
        make_operator("inpaint_box:fraction=0.25")(torch.rand(1, 3, 8, 8))
        make_operator("inpaint_random:fraction=0.5")(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("fill, invert, text", [(255, False, EVERY), (0, False, NONE), (0, True, EVERY)])
def test_mask_file_of_all_or_nothing_warns_once(tmp_path, fill, invert, text):
    path = tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), fill, dtype=np.uint8)).save(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        op = make_operator(f"inpaint_mask:path={str(path)!r},invert={invert}")
        op(torch.rand(1, 3, 8, 8)), op(torch.rand(1, 3, 8, 8))
    _one_warning(record, text)
    assert repr(str(path)) in str(record[0].message)


@pytest.mark.parametrize("spec, text", [("inpaint_box:fraction=1.0", EVERY), ("inpaint_box:fraction=0", NONE),
                                        ("inpaint_box:size=8", EVERY), ("inpaint_random:fraction=1.0", EVERY),
                                        ("inpaint_random:fraction=0", NONE), ("inpaint_random:fraction=0.001", NONE)])
def test_box_or_random_mask_of_all_or_nothing_warns_once_when_built(spec, text):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        op = make_operator(spec)
        x = torch.rand(1, 3, 8, 8)
        y = op(x)
        op(x), op(x.double()), op.adjoint(y)
    _one_warning(record, text)
    torch.testing.assert_close(y, torch.zeros_like(x) if text == EVERY else x)


@pytest.mark.parametrize("spec", ["inpaint_box:fraction=1.5", "inpaint_random:fraction=-0.1"])
def test_fraction_outside_zero_one_is_still_an_error(spec):
    with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\]"):
        make_operator(spec)


# -- mask files --------------------------------------------------------------------------------------------
def test_text_file_as_the_mask_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a mask\n")
    with pytest.raises(ValueError, match=re.escape("the mask file 'notes.txt' is not an image (")):
        make_operator("inpaint_mask:path=notes.txt")


def test_truncated_image_as_the_mask_file(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(f"the mask file {str(path)!r} is not an image (")):
        make_operator("inpaint_mask", path=path)


def test_missing_mask_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape("the mask file 'nothere.png' does not exist")):
        make_operator("inpaint_mask:path=nothere.png")


def test_directory_as_the_mask_file(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"the mask file {str(tmp_path)!r} is a directory")):
        make_operator("inpaint_mask", path=tmp_path)


def test_mask_file_path_of_the_wrong_type():
    with pytest.raises(ValueError, match="the mask file must be given as a path, got int 3"):
        make_operator("inpaint_mask:path=3")
