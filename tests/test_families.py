"""Every guidance method on a tiny model of every pipeline family, through load_model's recognition.

For each family of :mod:`guidance.backbones.registry` (tiny random components built from config, offline):

* ``load_model`` recognises the pipeline object, a folder written by ``save_pretrained`` (its
  ``model_index.json``) and the family's hub id (from an offline cache), and gives the family's adapter;
* FlowChef (latent and pixel loss), FLAIR, DPS, PnP-Flow, FlowDPS, PSLD and D-Flow each end with a smaller
  measurement residual (the objective's own loss) than unguided sampling from the same seed; the pixel-space
  solvers (OT-ODE, ICTM, Flower) refuse every latent family in one line;
* FlowChef editing keeps the preserved region closer to the source than unguided sampling does;
* FLAIR calibration runs, and FLAIR then reads the calibrated table.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import guidance
from guidance import MeasurementFidelity, get_method, load_model
from guidance.backbones.registry import BACKBONES, get_backbone
from guidance.features.calibration import calibrate
from operators import make_operator
from tasks.random_models import TINY_PIPELINES, tiny_pipeline

PROMPT = "a photo of a red fox sitting in the snow"
STEPS = 3

#: every family's tiny pipeline (tasks.random_models.TINY_PIPELINES) -> its condition's keyword arguments
FAMILIES = {name: ({"max_sequence_length": 32} if name == "flux" else {}) for name in TINY_PIPELINES}


#: the families that run every method in the default test run; the others run them under ``pytest -m slow``
#: (each family's own test file and the cheap tests below still run for every family by default)
CORE = ("sd3", "flux")
GRID = [pytest.param(case, marks=() if case in CORE else pytest.mark.slow) for case in FAMILIES]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def family_of(case: str) -> str:
    return case.split("-")[0]


#: each family's tiny pipeline, built once for the whole file
cached_pipeline = functools.lru_cache(maxsize=None)(tiny_pipeline)


@functools.lru_cache(maxsize=None)
def tiny_model(case: str):
    return load_model(cached_pipeline(case))


def setting(case: str):
    """(model, condition, image side) for a case: the smallest side with a 4x4 latent token grid at least."""
    model = tiny_model(case)
    cond = model.condition(PROMPT, **FAMILIES[case])
    side = max(32, 2 * model.size_multiple)
    return model, cond, side


def test_every_pipeline_family_has_a_case():
    families = {b.name for b in BACKBONES if b.pipelines}
    assert families == {family_of(case) for case in FAMILIES}


@pytest.mark.parametrize("case", FAMILIES)
def test_load_model_recognises_the_pipeline_and_its_folder(case, tmp_path):
    pipe = cached_pipeline(case)
    family = get_backbone(family_of(case))
    assert type(pipe).__name__ in family.pipelines
    model = tiny_model(case)
    assert type(model) is family.adapter_class()
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    loaded = load_model(str(tmp_path / "saved"), local_files_only=True)
    assert type(loaded) is family.adapter_class()
    model, cond, side = setting(case)
    x = torch.randn(1, *model.latent_shape(side, side), generator=_gen(3))
    again = loaded.condition(PROMPT, **FAMILIES[case])
    # the same weights through a saved folder: equal up to float32 rounding (2.4e-6 seen with torch 2.14 on SD3)
    torch.testing.assert_close(loaded.velocity(x, 0.7, again), model.velocity(x, 0.7, cond), rtol=0, atol=1e-5)


def _measurement(model, cond, side):
    """y = A(x_ref) for a decoded sample x_ref of another seed (so y is in the model's range)."""
    reference = guidance.sample(model, cond, num_steps=STEPS, height=side, width=side, generator=_gen(7),
                                progress=False).image
    operator = make_operator("sr:factor=2")
    return operator, operator(reference.clamp(-1, 1))


#: name -> (method, options, objective space, steps). The networks are random, so PnP-Flow's clean estimate at its
#: last level is far from the identity unless that level is small: 12 iterations on the official uniform grid
#: (last s = 1/12), with the step shrinking as s^1 toward the data.
METHODS = {
    "flowchef-latent": ("flowchef", {"step_size": 0.5}, "latent", STEPS),
    "flowchef-pixel": ("flowchef", {"step_size": 0.01, "inner_steps": 3}, "pixel", STEPS),
    "flair": ("flair", {}, "pixel", STEPS),
    "dps": ("dps", {}, "pixel", STEPS),
    "pnp_flow": ("pnp_flow", {"step_size": 0.1, "time_grid": "uniform", "step_exponent": 1.0}, "pixel", 12),
    "flowdps": ("flowdps", {"step_size": 3.0, "data_steps": 10}, "pixel", STEPS),
    "psld": ("psld", {"step_size": 0.6}, "pixel", STEPS),
    "d_flow": ("d_flow", {"max_iter": 1, "lbfgs_iter": 6, "inversion": "midpoint"}, "pixel", STEPS),
}
#: the solvers defined on images only (they apply A and Aᵀ to the state): refused on every latent family
PIXEL_ONLY = ("ot_ode", "ictm", "flower")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", GRID)
def test_every_method_reduces_the_residual_on_every_family(case, method):
    name, options, space, steps = METHODS[method]
    model, cond, side = setting(case)
    operator, y = _measurement(model, cond, side)
    objective = MeasurementFidelity(operator, y, space=space)
    common = dict(cond=cond, num_steps=steps, height=side, width=side, progress=False)
    unguided = guidance.sample(model, generator=_gen(1), **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = get_method(name, **options)(model, objective, generator=_gen(1), **common)
    objective.bind(model, side, side)
    with torch.no_grad():
        before = float(objective(model, unguided.x).sum())
        after = float(objective(model, out.x).sum())
    assert torch.isfinite(out.x).all()
    assert after < 0.9 * before, (case, method, before, after)


@pytest.mark.parametrize("method", PIXEL_ONLY)
@pytest.mark.parametrize("case", FAMILIES)
def test_the_pixel_space_solvers_refuse_every_latent_family_in_one_line(case, method):
    model, cond, side = setting(case)
    operator, y = make_operator("sr:factor=2"), torch.zeros(1, model.image_channels, side // 2, side // 2)
    with pytest.raises(ValueError, match=f"^{method} works on pixel-space models only .* is a latent model; use "
                                         f"flowdps, psld, d_flow, flowchef or flair on latent models$"):
        get_method(method)(model, MeasurementFidelity(operator, y), cond=cond, num_steps=STEPS, height=side,
                           width=side, progress=False)


@pytest.mark.parametrize("case", GRID)
def test_flowchef_editing_keeps_the_preserved_region_on_every_family(case):
    model, cond, side = setting(case)
    source = guidance.sample(model, cond, num_steps=STEPS, height=side, width=side, generator=_gen(5),
                             progress=False)
    mask = torch.zeros(side, side)
    mask[: side // 2] = 1.0  # edit the top half, keep the bottom half
    n = source.x[0].numel()
    out = get_method("flowchef_edit", step_size=0.25 * n / 1000.0, inner_steps=2, source_steps=1)(
        model, source_image=source.image.clamp(-1, 1), mask=mask, source_prompt=PROMPT,
        edit_prompt="a photo of a cat", num_steps=STEPS, generator=_gen(1), progress=False)
    unguided = guidance.sample(model, cond, num_steps=STEPS, height=side, width=side, generator=_gen(1),
                               progress=False)
    with torch.no_grad():
        z_src = model.encode(source.image.clamp(-1, 1))
    keep = z_src.shape[-2] // 2

    def gap(x):
        return float((x - z_src)[..., keep:, :].square().mean())

    assert torch.isfinite(out.x).all()
    assert gap(out.x) < 0.5 * gap(unguided.x), (case, gap(out.x), gap(unguided.x))


@pytest.mark.parametrize("case", GRID)
def test_flair_calibration_runs_and_flair_reads_the_table_on_every_family(case, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSTEER_CACHE", str(tmp_path / "cache"))
    model, _, side = setting(case)
    cond = model.condition(PROMPT, "", 2.0, **FAMILIES[case])
    images = torch.rand(2, 3, side, side, generator=_gen(0)) * 2 - 1
    table = calibrate(model, images, cond, num_points=3, generator=_gen(1), batch_size=2, progress=False)
    assert len(table) == 3 and torch.isfinite(table.weights).all() and (table.mse > 0).all()
    operator, y = _measurement(model, cond, side)
    out = get_method("flair")(model, MeasurementFidelity(operator, y), cond=cond, num_steps=STEPS, height=side,
                              width=side, generator=_gen(1), progress=False)
    assert out.info["crw_origin"] not in ("default", "constant", "given"), out.info["crw_origin"]


def test_flowsteer_models_lists_every_family_with_its_defaults(cli):
    import json

    code, out, err = cli("models", "--json")
    assert code == 0, err
    rows = {row["family"]: row for row in json.loads(out) if row["kind"] == "family"}
    assert set(rows) == {family_of(case) for case in FAMILIES}
    assert rows["qwen_image"]["pipelines"] == ["QwenImagePipeline"] and rows["sana"]["default_steps"] == 20
    code, text, err = cli("models")
    assert "flux2  FLUX.2: Flux2Pipeline, Flux2KleinPipeline" in text


@pytest.mark.parametrize("preset", ["flair_sr4", "flair_inpaint"])
@pytest.mark.parametrize("case", GRID)
def test_flair_presets_run_on_every_family(case, preset):
    """A FLAIR preset's options (data steps, data lr, DTA, its weight table; flowsteer presets) on every family, at 3
    steps and the tiny model's size: the measurement residual drops below unguided sampling's. (The FlowChef and
    PnP-Flow presets' steps are tuned to their published image sizes and models.)"""
    from guidance.features.presets import get_preset, method_from_preset

    model, cond, side = setting(case)
    method, _, objective_kwargs = method_from_preset(preset)
    spec = get_preset(preset)["operators"][0].split(":")[0]  # the preset's operator kind, at this small size
    operator = make_operator({"sr": "sr:factor=4,padding=symmetric", "inpaint_box": "inpaint_box:fraction=0.25"}[spec])
    reference = guidance.sample(model, cond, num_steps=STEPS, height=side, width=side, generator=_gen(7),
                                progress=False).image
    objective = MeasurementFidelity(operator, operator(reference.clamp(-1, 1)), **objective_kwargs)
    common = dict(cond=cond, num_steps=STEPS, height=side, width=side, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = method(model, objective, generator=_gen(1), **common)
    unguided = guidance.sample(model, generator=_gen(1), **common)
    objective.bind(model, side, side)
    with torch.no_grad():
        assert float(objective(model, out.x).sum()) < float(objective(model, unguided.x).sum()), (case, preset)


@pytest.mark.parametrize("case", FAMILIES)
def test_the_command_line_restores_with_a_saved_folder_of_every_family(case, tmp_path, cli, photo_32):
    """`flowsteer restore --model FOLDER` on a folder written by save_pretrained: recognised, guided, written."""
    cached_pipeline(case).save_pretrained(tmp_path / "model", safe_serialization=True)
    code, _, err = cli("restore", photo_32, "--simulate", "--operator", "sr:factor=2", "--method", "flowchef",
                       "--model", tmp_path / "model", "--prompt", PROMPT, "--steps", 2, "--out", tmp_path / "out",
                       "--quiet", "--device", "cpu")
    assert code == 0, err
    metrics = (tmp_path / "out" / "metrics.json")
    assert metrics.is_file() and (tmp_path / "out" / "restored.png").is_file()


@pytest.mark.parametrize("case", FAMILIES)
def test_load_model_takes_the_hub_id_of_every_family(case, tmp_path, monkeypatch):
    """The family's known checkpoint id (``flowsteer models``), from an offline hub cache holding the tiny
    pipeline under that id: recognised from its model_index.json, no network."""
    import huggingface_hub

    family = get_backbone(family_of(case))
    repo = "black-forest-labs/FLUX.2-klein-4B" if case == "flux2-klein" else family.checkpoints[0][0]
    assert repo in dict(family.checkpoints)
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    cached_pipeline(case).save_pretrained(folder / "snapshots" / ("0" * 40), safe_serialization=True)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(repo)
    assert type(model) is family.adapter_class() and type(model.pipeline).__name__ in family.pipelines


#: every restoration solver on a pixel-space network (a random UNet2DModel without autoencoder, the setting of the
#: PnP-Flow and Flower papers): name -> options
PIXEL_NETWORK_METHODS = {"ot_ode": {}, "ictm": {}, "flower": {}, "flowdps": {}, "psld": {}, "pnp_flow": {},
                         "d_flow": {"max_iter": 1, "lbfgs_iter": 3, "inversion": "midpoint"}}


@pytest.mark.parametrize("method", PIXEL_NETWORK_METHODS)
def test_every_solver_reduces_the_residual_on_a_pixel_network(method):
    from tasks.random_models.generic import pixel_flow_model, tiny_pixel_unet

    model = pixel_flow_model(tiny_pixel_unet(16))
    common = dict(num_steps=6, height=16, width=16, progress=False)
    reference = guidance.sample(model, generator=_gen(7), **common).image
    operator = make_operator("sr:factor=2", noise_std=0.05)
    objective = MeasurementFidelity(operator, operator.measure(reference, _gen(8)))
    unguided = guidance.sample(model, generator=_gen(1), **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = get_method(method, **PIXEL_NETWORK_METHODS[method])(model, objective, generator=_gen(1), **common)
    objective.bind(model, 16, 16)
    assert torch.isfinite(out.x).all()
    assert float(objective(model, out.x).sum()) < 0.9 * float(objective(model, unguided.x).sum())


#: the editors by prompt (RF-Solver editing without a generator: it is deterministic)
TEXT_EDITORS = ("flowedit", "rf_inversion", "rf_solver_edit")


@pytest.mark.parametrize("method", TEXT_EDITORS)
@pytest.mark.parametrize("case", GRID)
def test_the_text_editors_run_on_every_family(case, method):
    """FlowEdit, RF-Inversion and RF-Solver editing, 2 steps, the prompts as text (each family's condition with the
    editors' guidance scales): an image of the source's shape from a finite latent."""
    model, _, side = setting(case)
    source = torch.rand(1, 3, side, side, generator=_gen(5)) * 2 - 1
    noise = {} if method == "rf_solver_edit" else {"generator": _gen(1)}
    out = get_method(method)(model, source_image=source, source_prompt=PROMPT, edit_prompt="a photo of a cat",
                             num_steps=2, progress=False, **noise)
    assert out.x.shape == (1, *model.latent_shape(side, side)) and torch.isfinite(out.x).all(), (case, method)
    assert out.image.shape == source.shape, (case, method)
