"""`flowsteer generate` and `flowsteer edit` on the tiny SD3 folder (32x32, 3 steps), with tiny CLIP and ViT models
built from config and saved locally (nothing is downloaded), plus the reward / classifier loading of
guidance.features.rewards."""

import json

import pytest
import torch
from tiny_models import word_tokenizer

from tasks.commands.cli import main
from tasks.outputs.image_io import load_image, save_image
from guidance.features.rewards import load_classifier, load_reward, make_guide, resolve_label

TINY = ["--size", "32", "--steps", "3", "--quiet"]  # one number: a square (--size 32 32 in test_front_end_names)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """A reward for the tests (``test_generate_edit_cli:brightness``): the mean pixel value, per image."""
    return images.mean((1, 2, 3))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIPModel with a word tokenizer and a 32x32 image processor, saved as CLIPProcessor saves them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    word_tokenizer("clip").save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny two-class ViT image classifier ("dark", "bright") with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_labels=2, id2label={0: "dark", 1: "bright"},
                       label2id={"dark": 0, "bright": 1}, initializer_range=0.5)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text())


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- generate -----------------------------------------------------------------------------------------------
def test_reward_guidance_changes_the_image_and_raises_the_reward(tiny_sd3_folder, tmp_path, capsys):
    out = tmp_path / "bright"
    code = main(["generate", "--model", str(tiny_sd3_folder), "--reward", "test_generate_edit_cli:brightness",
                 "--weight", "100", "--prompt", "a photo of a red fox", "--num", "2", "--compare", "--out", str(out),
                 *TINY])
    assert code == 0, capsys.readouterr().err
    assert "mean reward" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"sample_0.png", "sample_1.png", "unguided_0.png", "unguided_1.png", "grid.png", "metrics.json"} <= names
    metrics = metrics_of(out)
    assert metrics["mean_score"] > metrics["unguided_mean_score"] + 0.005
    assert all(g > u for g, u in zip(metrics["scores"], metrics["unguided_scores"], strict=True))
    assert metrics["nfe"] == 3 and metrics["seconds"] > 0
    settings = metrics["settings"]
    assert settings["method"] == "flowchef" and settings["seeds"] == [0, 1] and settings["weight"] == 100
    assert settings["reward"] == "test_generate_edit_cli:brightness" and settings["height"] == 32
    guided, unguided = load_image(out / "sample_0.png"), load_image(out / "unguided_0.png")
    assert (guided - unguided).abs().mean() > 0.01
    # the score recorded is the reward of the saved image (up to 8-bit rounding)
    assert abs(float(brightness(guided)) - metrics["scores"][0]) < 0.01


def test_classifier_guidance_with_a_saved_vit(tiny_sd3_folder, tiny_vit, tmp_path, capsys):
    out = tmp_path / "vit"
    code = main(["generate", "--model", str(tiny_sd3_folder), "--classifier", str(tiny_vit), "--label", "Bright",
                 "--weight", "100", "--compare", "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    metrics = metrics_of(out)
    assert metrics["score_kind"] == "log p(label)"
    assert metrics["settings"]["label"] == 1 and metrics["settings"]["label_name"] == "bright"
    assert 0 < metrics["probabilities"][0] < 1
    assert metrics["mean_score"] > metrics["unguided_mean_score"]


def test_clip_reward_with_a_saved_tiny_clip(tiny_sd3_folder, tiny_clip, tmp_path, capsys):
    out = tmp_path / "clip"
    code = main(["generate", "--model", str(tiny_sd3_folder), "--reward", "clip:a photo of a red fox", "--clip",
                 str(tiny_clip), "--weight", "100", "--compare", "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    metrics = metrics_of(out)
    assert -1 <= metrics["scores"][0] <= 1 and metrics["settings"]["clip"] == str(tiny_clip)
    assert metrics["mean_score"] > metrics["unguided_mean_score"]


def test_missing_clip_weights_offline_is_one_clear_line(tiny_sd3_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["generate", "--model", str(tiny_sd3_folder), "--reward", "clip:a fox", "--clip",
                 "flowsteer-tests/no-such-clip", "--out", str(tmp_path / "x"), *TINY])
    assert code == 2
    line = error_line(capsys)
    assert "flowsteer-tests/no-such-clip" in line and "hf download" in line and "--clip FOLDER" in line
    assert not (tmp_path / "x" / "metrics.json").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--reward", "test_generate_edit_cli:brightness", "--method", "flair"], "generate runs one of"),
    (["--classifier", "test_generate_edit_cli:brightness"], "needs --label"),
    (["--reward", "test_generate_edit_cli:no_such_function"], "cannot import the reward"),
    (["--reward", "clp:a fox"], "did you mean 'clip:TEXT'"),
    (["--reward", "test_generate_edit_cli:brightness", "--option", "nonsense=1"], "has no option(s) ['nonsense']"),
])
def test_generate_errors(tiny_sd3_folder, tmp_path, capsys, arguments, message):
    assert main(["generate", "--model", str(tiny_sd3_folder), *arguments, "--out", str(tmp_path), *TINY]) == 2
    assert message in error_line(capsys)


def test_existing_outputs_need_overwrite(tiny_sd3_folder, tmp_path, capsys):
    command = ["generate", "--model", str(tiny_sd3_folder), "--reward", "test_generate_edit_cli:brightness",
               "--method", "unguided", "--out", str(tmp_path), *TINY]
    assert main(command) == 0
    assert main(command) == 2
    assert "already exists" in (line := error_line(capsys)) and "--overwrite" in line
    assert main([*command, "--overwrite"]) == 0


# -- edit ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def half_mask(tmp_path):
    mask = -torch.ones(1, 1, 32, 32)
    mask[..., 16:] = 1  # white (edit) on the right half
    return save_image(mask, tmp_path / "mask.png")


def test_edit_writes_outputs_and_keeps_the_unmasked_region(tiny_sd3_folder, photo_32, half_mask, tmp_path, capsys):
    from guidance.loading.models import load_model

    out = tmp_path / "edited"
    code = main(["edit", str(photo_32), "--method", "flowchef_edit", "--mask", str(half_mask), "--source-prompt",
                 "a photo of a cat", "--edit-prompt", "a photo of a dog", "--model", str(tiny_sd3_folder), "--steps", "3",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"edited.png", "grid.png", "metrics.json"}
    metrics = metrics_of(out)
    assert metrics["nfe"] == 6  # source and edit prompt per step
    # defaults scaled to the run: a third of the steps anchor the whole image, a stable step for a 4x4 latent
    assert metrics["settings"]["options"]["source_steps"] == 1 and metrics["settings"]["options"]["step_size"] < 0.6
    # the random tiny VAE does not reproduce the photo, so compare with its round trip D(E(x)): the kept
    # (left) half follows it much more closely than the edited (right) half
    model = load_model(tiny_sd3_folder)
    with torch.no_grad():
        reconstruction = model.decode(model.encode(load_image(photo_32))).clamp(-1, 1)
    change = (load_image(out / "edited.png") - reconstruction).abs().mean((0, 1, 2))
    assert change[:16].mean() < 0.6 * change[16:].mean()
    assert metrics["autoencoder_error"] == pytest.approx(float((reconstruction - load_image(photo_32)).abs().mean()),
                                                          abs=0.01)


def test_edit_errors(tiny_sd3_folder, photo_32, tmp_path, capsys):
    small = save_image(torch.zeros(1, 1, 16, 16), tmp_path / "small.png")
    base = ["--source-prompt", "a cat", "--edit-prompt", "a dog", "--model", str(tiny_sd3_folder), "--steps", "2",
            "--quiet", "--out", str(tmp_path / "out")]
    assert main(["edit", str(photo_32), "--mask", str(small), *base]) == 2
    line = error_line(capsys)
    assert "16x16" in line and "32x32" in line and "mask" in line
    assert main(["edit", str(tmp_path / "missing.png"), "--mask", str(small), *base]) == 2
    assert "does not exist" in error_line(capsys)
    odd, odd_mask = (save_image(torch.zeros(1, c, 36, 36), tmp_path / f"odd{c}.png") for c in (3, 1))
    assert main(["edit", str(odd), "--mask", str(odd_mask), *base]) == 2
    assert "multiples of 8" in (line := error_line(capsys)) and "--resize" in line
    assert main(["edit", str(odd), "--mask", str(odd_mask), *base, "--resize"]) == 0
    assert metrics_of(tmp_path / "out")["settings"]["height"] == 40
    assert main(["edit", str(odd), "--mask", str(odd_mask), *base, "--resize"]) == 2
    assert "--overwrite" in error_line(capsys)


# -- guidance.features.rewards -----------------------------------------------------------------------------------------
def test_labels_by_index_or_name():
    names = ["dark", "bright"]
    assert resolve_label(1, names) == resolve_label("1", names) == resolve_label("BRIGHT", names) == 1
    with pytest.raises(ValueError, match="did you mean 'bright'"):
        resolve_label("brigt", names)
    with pytest.raises(ValueError, match="out of range: use 0..1"):
        resolve_label(2, names)
    with pytest.raises(ValueError, match="must be a class index"):
        resolve_label("cat", None)


def test_guides_and_loaders(tiny_clip, tiny_vit, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        make_guide(reward=brightness, classifier=brightness, label=0)
    with pytest.raises(ValueError, match="--label goes with --classifier"):
        make_guide(reward=brightness, label=1)
    # a CLIP folder is not an image classifier: its classification head would be random
    with pytest.raises(ValueError, match="lacks 'classifier"):
        load_classifier(str(tiny_clip))
    with pytest.raises(ValueError, match="does not exist"):
        load_reward("clip:a fox", str(tmp_path / "nowhere"))
    # 'file.py:function' and the class names of a callable's `labels`
    file = tmp_path / "colour.py"
    file.write_text("def logits(x):\n    return x.mean((2, 3))\nlogits.labels = ('red', 'green', 'blue')\n")
    guide = make_guide(classifier=f"{file}:logits", label="blue")
    assert guide.settings["label"] == 2 and guide.settings["label_name"] == "blue"
    # the CLIP reward is differentiable in the image
    images = torch.zeros(2, 3, 32, 32, requires_grad=True)
    reward = load_reward("clip:a red fox", str(tiny_clip))
    value = reward(images)
    (grad,) = torch.autograd.grad(value.sum(), images)
    assert value.shape == (2,) and grad.abs().sum() > 0
    vit = load_classifier(str(tiny_vit))
    assert vit.names == ["dark", "bright"] and vit.logits(images).shape == (2, 2)
