"""Parity presets build valid methods, objectives and operators; their parity variants; the listing."""

import json

import pytest

from guidance.methods import get_method
from guidance.features.presets import get_preset, list_presets, method_from_preset
from operators import make_operator


def test_presets_of_both_papers_are_listed():
    names = list_presets()
    assert any(n.startswith("flowchef") for n in names) and any(n.startswith("flair") for n in names)
    assert len(names) >= 8


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds(name):
    preset = get_preset(name)
    get_method(preset["method"], **preset.get("options", {}))
    method, num_steps, objective = method_from_preset(name)
    assert callable(method) and num_steps >= 1
    assert set(objective) <= {"space", "weight", "reduction"}
    for spec in preset.get("operators") or []:
        make_operator(spec)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean"):
        get_preset("flair_inpain")


@pytest.mark.parametrize("name", [n for n in list_presets() if get_preset(n).get("parity")])
def test_the_parity_variant_switches_the_named_quirks_on(name):
    preset, parity = get_preset(name), get_preset(name, official_quirks=True)
    assert parity["official_quirks"] is True and parity["quirks"] == preset["quirks"]
    assert parity["options"] == {**preset["options"], **preset["parity"].get("options", {})}
    assert parity["operators"] == (preset["parity"].get("operators") or preset["operators"])
    get_method(parity["method"], **parity["options"])  # the quirk options are real method options
    for spec in parity["operators"] or []:
        make_operator(spec)
    method, _, objective = method_from_preset(name, official_quirks=True)
    assert objective == (parity["objective"] or {})


def test_a_preset_without_quirks_has_no_parity_variant():
    plain = [n for n in list_presets() if not get_preset(n).get("parity")]
    assert plain and "flair_sr12" in plain
    with pytest.raises(ValueError, match="no official quirks"):
        get_preset(plain[0], official_quirks=True)
    with pytest.raises(ValueError, match="True or False"):
        get_preset("flowchef_pixel_rf", official_quirks="yes")


def test_preset_run_applies_the_preset_and_records_overrides():
    from tasks.commands.benchmark.parity import preset_run

    given = dict.fromkeys(("model", "dtype", "decoder", "encoder", "size", "seed", "num_steps", "prompt",
                           "negative_prompt", "guidance_scale", "noise_std"))
    arguments, record = preset_run("flair_motion_deblur", given, [], [], {})
    preset = get_preset("flair_motion_deblur")
    assert record["overrides"] == {} and record["official_quirks"] is False
    assert (arguments["size"], arguments["num_steps"], arguments["seed"]) == (768, 50, 42)
    assert arguments["operators"] == preset["operators"] and arguments["methods"] == ["flair"]
    assert arguments["options"] == {"flair": preset["options"]} and arguments["space"] == "pixel"
    arguments, record = preset_run("flair_motion_deblur", {**given, "seed": 42, "num_steps": 10},
                                   ["motion_blur"], [], {"flair": {"data_steps": 15, "data_lr": 0.2}})
    assert record["overrides"] == {"num_steps": {"preset": 50, "used": 10},
                                   "operators": {"preset": preset["operators"], "used": ["motion_blur"]},
                                   "options": {"preset": {"data_lr": 0.1}, "used": {"data_lr": 0.2}}}
    arguments, record = preset_run("flowchef_pixel_rf", given, [], [], {}, official_quirks=True)
    assert record["official_quirks"] and arguments["options"]["flowchef"]["official_quirks"] is True
    assert any("centring=official" in spec for spec in arguments["operators"])
    assert arguments["objective_options"] == {"weight": 1.0, "reduction": "mean"}
    with pytest.raises(ValueError, match="cannot be benchmarked"):
        preset_run("flowchef_flux_edit", given, [], [], {})
    with pytest.raises(ValueError, match="--option given for 'dps'"):
        preset_run("flair_sr12", given, [], [], {"dps": {"step_size": 1.0}})


def test_the_presets_listing(cli):
    code, out, _ = cli("presets")
    assert code == 0
    for name in list_presets():
        assert f"{name}  " in out
    assert "source: Erbach et al." in out and "benchmark --preset NAME" in out
    code, out, _ = cli("presets", "--json")
    rows = json.loads(out)
    assert {row["name"] for row in rows} == set(list_presets()) and all(row["source"] for row in rows)
    code, _, err = cli("benchmark", "--images", ".", "--out", "nowhere", "--official-quirks")
    assert code != 0 and "official_quirks applies to a --preset" in err
