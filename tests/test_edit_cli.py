"""`flowsteer edit`: every editor (--method) on the tiny SD3 folder (32x32, 2 steps), a classifier edit on the default
model, a folder of images with a prompts file (FlowEdit's edits.yaml layout, YAML or JSON; resumable), and the
command's one-line errors."""

import json

import pytest
import torch

from guidance.methods import method_options
from tasks.outputs.image_io import save_image

STEPS = ["--steps", "2", "--quiet"]
PROMPTS = ["--source-prompt", "a photo of a cat", "--edit-prompt", "a photo of a dog"]
OUTPUTS = {"edited.png", "grid.png", "metrics.json"}


def metrics_of(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture()
def half_mask(tmp_path):
    mask = -torch.ones(1, 1, 32, 32)
    mask[..., 16:] = 1  # white (edit) on the right half
    return save_image(mask, tmp_path / "mask.png")


#: --method (a suffix names the case) -> (with --mask?, NFE) at 2 steps (CFG counted once): FlowEdit runs n_max = round(2 x 33/50) = 1 step with
#: the source and edit velocities; RF-Inversion one evaluation per step each way; RF-Solver two per step each way;
#: FlowChef editing the source and edit velocities per step; inversion_edit (FireFlow, strength 0.7: both steps)
#: N + 1 each way
EDITORS = {
    "flowedit": (False, 2),
    "flowedit-masked": (True, 2),
    "rf_inversion": (False, 4),
    "rf_solver_edit": (False, 8),
    "flowchef_edit": (True, 4),
    "inversion_edit": (False, 6),
}


@pytest.mark.parametrize("editor", EDITORS)
def test_every_editor_writes_its_outputs_and_records_its_settings(editor, tiny_sd3_folder, photo_32, half_mask,
                                                                  tmp_path, cli):
    masked, nfe = EDITORS[editor]
    method = editor.split("-")[0]
    flags = ["--mask", half_mask] if masked else []
    out = tmp_path / "out"
    code, stdout, err = cli("edit", photo_32, "--method", method, *flags, *PROMPTS, "--model", tiny_sd3_folder, *STEPS,
                            "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == OUTPUTS
    metrics = metrics_of(out)
    settings = metrics["settings"]
    assert settings["method"] == method and metrics["nfe"] == nfe and settings["num_steps"] == 2
    assert settings["mask"] == (str(half_mask) if masked else None)
    assert (metrics["change_inside_mask"] is None) == (not masked)
    assert settings["source_prompt"] == "a photo of a cat" and settings["edit_prompt"] == "a photo of a dog"
    assert set(settings["options"]) == set(method_options(method)) - {"source_image", "mask", "source_prompt",
                                                                      "edit_prompt"}
    assert settings["seed"] == (None if method in ("inversion_edit", "rf_solver_edit") else 0)
    assert f"{method}: {nfe} NFE" in stdout


def test_a_classifier_edit_on_the_default_model(photo_32, tmp_path, cli):
    out = tmp_path / "out"
    code, stdout, err = cli("edit", photo_32, "--classifier", "default", "--label", "texture", "--strength", "0.5",
                            *STEPS, "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == OUTPUTS
    metrics = metrics_of(out)
    settings = metrics["settings"]
    assert settings["method"] == "inversion_edit" and settings["options"]["strength"] == 0.5
    assert settings["guide"]["label_name"] == "texture" and settings["model"] == "default"
    assert metrics["nfe"] == 4  # start int(2 - 2 x 0.5) = 1: one FireFlow step each way, N + 1 evaluations
    assert all(isinstance(metrics[k], float) for k in ("score_source", "score_edited"))
    assert "score" in stdout


# -- a folder with a prompts file ------------------------------------------------------------------------------
@pytest.fixture()
def edit_folder(tmp_path):
    """Two images (one in a subfolder, with a mask) and the layout of FlowEdit's edits.yaml."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    save_image(torch.stack([x, y, x * y])[None] * 0.8, folder / "cat.png")
    save_image(torch.stack([y, x, -x * y])[None] * 0.8, folder / "sub" / "house.png")
    mask = -torch.ones(1, 1, 32, 32)
    mask[..., :16, :] = 1
    save_image(mask, folder / "house_mask.png")
    entries = [{"input_img": "cat.png", "source_prompt": "a photo of a cat",
                "target_prompts": ["a photo of a dog", "a photo of a fox"]},
               {"input_img": "sub/house.png", "source_prompt": "a house", "target_prompts": ["a castle"],
                "mask": "house_mask.png"}]
    return folder, entries


def _written(out) -> set:
    return {str(p.parent.relative_to(out)) for p in out.rglob("metrics.json")}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_prompts_file_writes_each_edit_and_resumes(suffix, edit_folder, tiny_sd3_folder, tmp_path, cli):
    import yaml

    folder, entries = edit_folder
    prompts = tmp_path / f"edits{suffix}"
    prompts.write_text(json.dumps(entries) if suffix == ".json" else yaml.safe_dump(entries))
    out = tmp_path / "out"
    run = ("edit", folder, "--prompts", prompts, "--model", tiny_sd3_folder, *STEPS, "--out", out)
    code, stdout, err = cli(*run)
    assert code == 0, err
    assert _written(out) == {"cat/0", "cat/1", "house/0"} and "wrote 3 edit(s)" in stdout
    assert metrics_of(out / "cat" / "1")["settings"]["edit_prompt"] == "a photo of a fox"
    house = metrics_of(out / "house" / "0")
    assert house["settings"]["mask"] == str(folder / "house_mask.png") and house["change_inside_mask"] is not None
    if suffix == ".json":
        return
    before = (out / "cat" / "0" / "metrics.json").stat().st_mtime_ns
    code, stdout, err = cli(*run)
    assert code == 0 and "wrote 0 edit(s)" in stdout, err
    assert (out / "cat" / "0" / "metrics.json").stat().st_mtime_ns == before
    (out / "cat" / "1" / "edited.png").unlink()  # an unfinished edit is redone
    code, stdout, err = cli(*run)
    assert code == 0 and "wrote 1 edit(s)" in stdout, err
    code, stdout, err = cli(*run, "--overwrite")
    assert code == 0 and "wrote 3 edit(s)" in stdout, err
    assert (out / "cat" / "0" / "metrics.json").stat().st_mtime_ns != before


# -- errors ----------------------------------------------------------------------------------------------------
def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


ERRORS = {
    "classifier-with-flowedit": (["--method", "flowedit", *PROMPTS, "--classifier", "default", "--label", "texture"],
                                 "flowedit edits with prompts only; a classifier or reward needs --method"),
    "mask-with-rf_inversion": (["--method", "rf_inversion", *PROMPTS, "--mask", "MASK"],
                               "rf_inversion edits the whole image"),
    "flowchef_edit-without-mask": (["--method", "flowchef_edit", *PROMPTS], "flowchef_edit edits inside a mask: "
                                                                           "give --mask"),
    "strength-with-flowedit": (["--method", "flowedit", *PROMPTS, "--strength", "0.5"],
                               "flowedit has no strength (--strength); it is an option of rf_inversion, "
                               "inversion_edit"),
    "inversion_edit-without-a-goal": (["--method", "inversion_edit"], "inversion_edit edits toward an edit prompt, a "
                                                                      "classifier label"),
    "prompts-on-the-default-model": (PROMPTS, "the model 'default' takes no text: use a text-conditioned model"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_edit_errors_are_one_line(case, photo_32, half_mask, tmp_path, cli):
    flags, message = ERRORS[case]
    flags = [half_mask if flag == "MASK" else flag for flag in flags]
    out = tmp_path / "out"
    code, _, err = cli("edit", photo_32, *flags, *STEPS, "--out", out)
    assert code == 2
    assert message in _one_line(err)
    assert not out.exists()


def test_an_unknown_method_is_refused_by_argparse(photo_32, cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("edit", photo_32, "--method", "sdedit", *PROMPTS)
    assert exit_.value.code == 2 and "invalid choice: 'sdedit'" in capsys.readouterr().err


def test_folder_errors_are_one_line(edit_folder, half_mask, tmp_path, cli):
    import yaml

    folder, entries = edit_folder
    prompts = tmp_path / "edits.yaml"
    prompts.write_text(yaml.safe_dump(entries))
    out = tmp_path / "out"
    code, _, err = cli("edit", folder, *STEPS, "--out", out)
    assert code == 2 and "is a folder: give --prompts FILE with its edits" in _one_line(err)
    code, _, err = cli("edit", folder, "--prompts", prompts, "--mask", half_mask, *STEPS, "--out", out)
    assert code == 2 and "--mask is set per edit in the prompts file with --prompts; drop it" in _one_line(err)

    broken = {
        "missing-image": ([{**entries[0], "input_img": "dog.png"}], "entry 0 of bad.yaml: the image"),
        "no-targets": ([entries[0], {"input_img": "cat.png", "source_prompt": "a cat"}],
                       "entry 1 of bad.yaml needs target_prompts (a list of texts) or edit_prompt (one text)"),
        "not-a-list": ({"input_img": "cat.png"}, "must hold a list of edits"),
    }
    bad = tmp_path / "bad.yaml"
    for name, (content, message) in broken.items():
        bad.write_text(yaml.safe_dump(content))
        code, _, err = cli("edit", folder, "--prompts", bad, *STEPS, "--out", out)
        assert code == 2 and message in _one_line(err), name
    bad.write_text("- input_img: cat.png\n  target_prompts: [a dog\n")
    code, _, err = cli("edit", folder, "--prompts", bad, *STEPS, "--out", out)
    assert code == 2 and f"the prompts file {str(bad)!r} is not valid yaml: " in _one_line(err)
    code, _, err = cli("edit", folder, "--prompts", prompts, *STEPS, "--out", out)  # the default model
    assert code == 2 and "takes no text: use a text-conditioned model" in _one_line(err)
    assert not out.exists()
