"""Bad inputs to rewards, classifiers, design, methods, restore and calibration: each example runs as a user would
and must be refused in one line that names the value and the fix, before anything is written."""

import logging
from pathlib import Path

import pytest
import torch

import guidance
from guidance import MeasurementFidelity, RewardObjective, get_method, load_model
from operators import make_operator
from tasks.outputs.image_io import save_image

pytestmark = pytest.mark.usefixtures("offline_cache")

USER_FUNCTIONS = '''
import torch

def text(images):
    return "good"

def nan(images):
    return images.mean((1, 2, 3)) * float("nan")

def ten_logits(images):
    return images.flatten(1)[:, :10]

def nan_score(h):
    return h.sum((1, 2)) * float("nan")
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A user's module of rewards, classifiers and scores in the current folder (`myfunctions:NAME`)."""
    (tmp_path / "myfunctions.py").write_text(USER_FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    return "myfunctions"


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowsteer: error: "), stderr
    assert "Traceback" not in stderr and "--debug" not in stderr, stderr  # a ValueError for the user, exit 2
    return lines[0]


# -- 1. rewards and classifiers -------------------------------------------------------------------------------
def test_a_reward_that_returns_a_string_is_refused_naming_what_it_returned(cli, user_module, tmp_path):
    out = tmp_path / "g"
    code, _, stderr = cli("generate", "--reward", f"{user_module}:text", "--size", 32, 32, "--steps", 2, "--quiet",
                          "--out", out)
    line = one_line(stderr)
    assert code == 2 and "the reward 'myfunctions:text' returned str 'good'" in line
    assert "a tensor (or NumPy array) of one score per image, shape (1,)" in line
    assert not out.exists()


def test_a_reward_that_returns_nan_is_refused_as_nan_not_as_a_divergence(model):
    def brightness_nan(images):
        return images.mean((1, 2, 3)) * float("nan")

    with pytest.raises(ValueError, match=r"the reward 'brightness_nan' returned NaN for 1 of 1 image\(s\)") as error:
        get_method("flowchef")(model, RewardObjective(brightness_nan), num_steps=2, height=32, width=32,
                               progress=False, generator=torch.Generator().manual_seed(0))
    assert "step_size" not in str(error.value) and "must return finite scores" in str(error.value)
    with pytest.raises(ValueError, match=r"returned a tensor of shape \(1, 2\) for 1 image\(s\)"):
        get_method("best_of_n", candidates=1)(model, RewardObjective(lambda x: x.flatten(1)[:, :2]), num_steps=2,
                                               height=32, width=32, progress=False)


def test_a_classifier_label_out_of_range_is_refused_before_the_model_loads(cli, user_module, tmp_path, monkeypatch):
    import tasks.commands.restore

    monkeypatch.setattr(tasks.commands.restore, "open_model", lambda *a, **k: pytest.fail("the flow model was loaded"))
    out = tmp_path / "g"
    code, _, stderr = cli("generate", "--classifier", f"{user_module}:ten_logits", "--label", 5000, "--size", 32, 32,
                          "--steps", 2, "--quiet", "--out", out)
    line = one_line(stderr)
    assert code == 2 and "label 5000 is out of range: use 0..9 for the classifier's 10 classes" in line
    code, _, stderr = cli("generate", "--classifier", "default", "--label", 5000, "--out", out)
    line = one_line(stderr)
    assert code == 2 and "label 5000 is out of range: use 0..3" in line and "flowsteer models" in line
    assert not out.exists()


def test_a_classifier_objective_checks_its_label_when_bound_before_any_step(model):
    calls = []

    def ten_logits(images):
        calls.append(images.shape[0])
        return images.flatten(1)[:, :10]

    objective = guidance.ClassifierObjective(ten_logits, 5000)  # no class count known yet
    with pytest.raises(ValueError, match=r"label 5000 is out of range for a classifier with 10 classes: use 0..9, "
                                         r"or a class name"):
        objective.bind(model, 32, 32)
    assert calls == [1]  # one blank probe image, no sampling


# -- 2. design ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--gamma", "inf"], ("the guidance scale --gamma must be a finite number, got inf", "--gamma 2")),
    (["--gamma", "-1"], ("the guidance scale --gamma must be a number >= 0, got -1", "--gamma 2")),
    (["--train-steps", "0"], ("--train-steps 0 does nothing without --train FILE", "drop --train-steps")),
    (["--save-flow", "flow_dir"], ("--save-flow flow_dir does nothing without --train FILE", "drop --save-flow")),
])
def test_design_refuses_gamma_and_training_flags_that_do_nothing(cli, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "design.json"
    code, stdout, stderr = cli("design", "--score", "motif:GA", "--num", 2, "--steps", 2, "--quiet", "--out", out,
                               *args)
    line = one_line(stderr)
    assert code == 2 and all(n in line for n in needles), line
    assert stdout == "" and not out.exists() and not (tmp_path / "flow_dir").exists()


def test_design_refuses_a_score_that_returns_nan(cli, user_module, tmp_path):
    out = tmp_path / "design.json"
    for method in ("straight_through", "particles"):
        code, _, stderr = cli("design", "--score", f"{user_module}:nan_score", "--num", 2, "--steps", 2, "--quiet",
                              "--method", method, "--out", out)
        line = one_line(stderr)
        assert code == 2 and "the score 'myfunctions:nan_score' returned NaN for 4 of 4 sequence(s)" in line
        assert "multinomial" not in line and not out.exists()


# -- 3. a model name where a model goes -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flair", "flowchef", "dps", "pnp_flow", "unguided", "best_of_n"])
def test_a_model_name_is_refused_at_the_entry_of_every_method(name):
    objective = MeasurementFidelity("sr:factor=2", torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"^model must be a FlowModel, got the string 'default'; load one with "
                                         r"guidance.load_model\('default'\)$"):
        get_method(name)("default", objective, num_steps=2)


def test_a_model_name_is_refused_by_sample_and_start_state():
    for call in (lambda: guidance.sample("default", num_steps=2),
                 lambda: guidance.start_state("my/model", num_steps=2)):
        with pytest.raises(ValueError, match=r"model must be a FlowModel, got the string '.*'; load one with "
                                             r"guidance.load_model"):
            call()


# -- 4. a measurement whose implied image size the model does not take ----------------------------------------
def test_a_15x15_measurement_for_sr_x2_names_the_measurement_and_the_size_that_works(cli, tmp_path, model):
    y15 = save_image(torch.zeros(1, 3, 15, 15), tmp_path / "y15.png")
    out = tmp_path / "r"
    code, _, stderr = cli("restore", y15, "--operator", "sr:factor=2", "--steps", 2, "--quiet", "--out", out)
    line = one_line(stderr)
    assert code == 2 and "the measurement is 15x15 (HxW), so the restored image would be 30x30" in line
    assert "multiples of 16" in line and "(e.g. 16x16 -> 32x32)" in line and "--resize" in line
    assert "height=30" not in line and not out.exists()

    from tasks.commands.restore import restore  # the Python API says the same, offering a resize instead of --resize

    with pytest.raises(ValueError, match=r"measurement is 15x20 \(HxW\), so the restored image would be 30x40.*"
                                         r"16x24 -> 32x48.*resize the measurement to 16x24 first"):
        restore(model, torch.zeros(1, 3, 15, 20), "sr:factor=2", num_steps=2, progress=False)


# -- 5. a noise std far beyond the image range ----------------------------------------------------------------
def test_a_huge_noise_std_is_refused_where_the_operator_is_built(cli, photo_32, tmp_path):
    out = tmp_path / "r"
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", "sr:factor=2", "--noise-std", "1e6",
                          "--steps", 2, "--quiet", "--out", out)
    line = one_line(stderr)
    assert code == 2 and "noise_std" in line and "1e+06" in line and "<= 2" in line and "[-1, 1]" in line
    assert "diverged" not in line and "step" not in line and not out.exists()
    for spec in ("gaussian_blur", "inpaint_box", "sr:factor=4"):
        with pytest.raises(ValueError, match=r"noise_std .*<= 2, got 50"):
            make_operator(spec, noise_std=50)
    assert make_operator("sr:factor=2", noise_std=0.5).noise_std == 0.5  # ordinary levels still pass


# -- 6. a cached calibration table is announced, and can be cleared -------------------------------------------
def test_a_run_that_uses_a_cached_calibration_says_so_and_clear_removes_it(cli, photo_32, tmp_path, model, caplog):
    import shutil

    from guidance.features.calibration import calibrate, clear_crw, crw_cache_dir

    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cache = tmp_path / "crw"
    path = calibrate(model, images, num_points=2, cache_dir=cache, progress=False).metadata["path"]

    # the command line: one line on stderr naming the table and how to clear it
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", "sr:factor=2", "--steps", 2, "--quiet",
                          "--option", f"crw_cache_dir={cache}", "--option", "data_steps=0", "--consistency-steps", 0,
                          "--out", tmp_path / "r")
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if "calibration table" in line]
    assert len(notes) == 1, stderr
    assert notes[0].startswith(f"flowsteer: warning: FLAIR uses the calibration table {path}, cached by `flowsteer "
                               f"calibrate`"), stderr
    assert "delete that file or run `flowsteer calibrate --clear --model " in notes[0]
    assert f"--cache-dir {cache}`" in notes[0]

    # the API: a warning on the flowsteer logger (the same table, now in the user's cache)
    crw_cache_dir().mkdir(parents=True)
    cached = shutil.copy(path, crw_cache_dir())
    y = make_operator("sr:factor=2")(images)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowsteer"):
        result = get_method("flair", data_steps=0)(model, MeasurementFidelity("sr:factor=2", y), num_steps=2,
                                                   progress=False, generator=torch.Generator().manual_seed(0))
    assert result.info["crw_origin"] == "cache"
    notes = [r.getMessage() for r in caplog.records if r.name == "flowsteer"]
    assert len(notes) == 1 and f"FLAIR uses the calibration table {cached}," in notes[0], notes
    assert "flowsteer calibrate --clear --model" in notes[0] and "--cache-dir" not in notes[0]

    # clearing: the command line for the user's cache, the API for any folder
    code, stdout, stderr = cli("calibrate", "--clear", "--model", "default", "--quiet")
    assert code == 0 and f"removed {cached}" in stdout and not list(crw_cache_dir().glob("*.json")), stderr
    assert clear_crw(model, cache) == [Path(path)] and not Path(path).exists()
    code, _, stderr = cli("calibrate")
    assert code == 2 and "--images DIR is required" in one_line(stderr) and "--clear" in stderr


# -- 7. sizes are HxW -----------------------------------------------------------------------------------------
def test_an_empty_image_names_its_size_height_first():
    from PIL import Image

    from guidance.loading.images import image_tensor

    with pytest.raises(ValueError, match=r"the PIL image is empty \(0x7 pixels\)"):
        image_tensor(Image.new("RGB", (7, 0)))
