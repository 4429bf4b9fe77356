"""Parity presets build valid methods, objectives and operators."""

import pytest

from guidance.methods import get_method
from guidance.presets import get_preset, list_presets, method_from_preset
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
