"""Names at the front end: class names in ClassifierObjective, the bundled classifiers 'default' and
'default:judge', plain whole-sentence descriptions in the listings and demos, no loading bars from transformers
or diffusers in the CLI, and the classifier demo's defaults on the default model."""

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guidance import ClassifierObjective
from guidance.backbones.default import default_model_dir
from tasks.commands.generate import classifier_source
from guidance.features.rewards import load_classifier

ROOT = Path(__file__).resolve().parents[1]
DEMOS = sorted((ROOT / "demos").glob("*.py"))
CLASSES = ["retina", "hubble", "tissue", "texture"]  # the bundled classifiers' id2label
MARKUP = re.compile(r"`|:(class|func|meth|mod|attr):")


def offline_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def assert_plain_sentences(text: str, what: str) -> None:
    assert text and not MARKUP.search(text), f"{what}: {text!r}"
    assert text.rstrip()[-1] in ".!?", f"{what} is cut mid-sentence: {text!r}"


# -- 1. class names in ClassifierObjective --------------------------------------------------------------------
def test_classifier_objective_takes_class_names():
    from transformers import AutoModelForImageClassification

    classifier = AutoModelForImageClassification.from_pretrained(default_model_dir() / "classifier")
    objective = ClassifierObjective(classifier, label="hubble")  # the user's exact call
    assert objective.label.item() == 1
    assert objective.loss(torch.zeros(2, 3, 64, 64)).shape == (2,)
    assert ClassifierObjective(classifier, label=["Tissue", "retina", 3]).label.tolist() == [2, 0, 3]
    assert ClassifierObjective(classifier, label=torch.tensor([1, 3])).label.tolist() == [1, 3]
    assert ClassifierObjective(classifier, label=2).label.item() == 2
    # the callable load_classifier returns carries the model, and so its names
    assert ClassifierObjective(load_classifier(classifier_source("default")).logits, "texture").label.item() == 3

    with pytest.raises(ValueError, match=r"unknown class name 'hubbel'; did you mean 'hubble'\? The classifier's 4 "
                                         r"classes: 'hubble', 'retina', 'tissue', 'texture'"):
        ClassifierObjective(classifier, label="hubbel")

    def logits(images):
        return images.mean((2, 3))

    with pytest.raises(ValueError, match="has no class names .* pass a class index"):
        ClassifierObjective(logits, label="hubble")
    logits.labels = ("red", "green", "blue")
    assert ClassifierObjective(logits, label="blue").label.item() == 2


# -- 2. the bundled classifiers by name -----------------------------------------------------------------------
def test_bundled_classifier_names_resolve_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    monkeypatch.delenv("FLOWSTEER_DEFAULT_MODEL", raising=False)
    assert Path(classifier_source("default")) == default_model_dir() / "classifier"
    assert Path(classifier_source("default:judge")) == default_model_dir() / "judge"
    assert classifier_source("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    with pytest.raises(ValueError, match="did you mean 'default:judge'"):
        classifier_source("default:judg")


def test_generate_with_the_default_classifier_from_another_folder(cli, tiny_sd3_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("generate", "--model", tiny_sd3_folder, "--classifier", "default", "--label", "hubble",
                         "--size", "32", "32", "--steps", "2", "--out", tmp_path / "out")
    assert code == 0, err
    settings = json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]
    assert settings["classifier"] == "default" and settings["label"] == 1 and settings["label_name"] == "hubble"
    # 4. no weight-loading bars from transformers / diffusers, but flowsteer's own sampling bar is there
    assert "Loading" not in err, err
    assert "flowchef" in err


def test_models_lists_the_bundled_classifiers(cli):
    code, out, err = cli("models")
    assert code == 0, err
    for name in ("default", "default:judge"):
        line = next(i for i, text in enumerate(out.splitlines()) if text.startswith(f"{name}  ") and "classifier"
                    in text)
        assert ", ".join(CLASSES) in out.splitlines()[line + 1]
    code, out, err = cli("models", "--json")
    rows = {(row["kind"], row["source"]): row for row in json.loads(out)}
    assert rows[("classifier", "default:judge")]["labels"] == CLASSES
    assert rows[("model", "default")]["status"] == "available"


# -- 3. plain, whole-sentence descriptions ---------------------------------------------------------------------
@pytest.mark.parametrize("listing", ["operators", "methods"])
def test_listings_print_plain_whole_sentences(cli, listing):
    code, out, err = cli(listing, "--json")
    assert code == 0, err
    rows = json.loads(out)
    code, text, err = cli(listing)
    for row in rows:
        assert_plain_sentences(row["summary"], f"{listing} {row['name']}")
        assert f"  {row['summary']}\n" in text


def test_demo_help_is_plain_whole_sentences(capsys, monkeypatch):
    """Each demo's --help, run in this process as ``python demos/NAME.py --help`` would run it."""
    for demo in DEMOS:
        monkeypatch.setattr(sys, "argv", [str(demo), "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(demo), run_name="__main__")
        assert done.value.code in (0, None)
        out = capsys.readouterr().out
        description = " ".join(out.split("\n\n")[1].split())  # the paragraph after the usage
        assert_plain_sentences(description, f"demos/{demo.stem}.py --help")


# -- 5. the classifier demo's defaults on the default model ------------------------------------------------------
def test_classifier_demo_defaults_run_on_the_default_model(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "demos" / "classifier_guidance.py"), "--steps", "1", "--num",
                          "1", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=offline_env(),
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "p(blue) unguided" in run.stdout and (tmp_path / "out" / "grid.png").is_file()


def test_classifier_demo_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "demos" / "classifier_guidance.py"), "--option", "nope=1",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, env=offline_env(),
                         cwd=tmp_path, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("classifier_guidance: error:"), run.stderr
