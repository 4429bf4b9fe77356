"""CRW calibration: the measured MSE against closed form, the table, its cache and its use by FLAIR."""

import json
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from tiny_models import PROMPT, sd3_pipeline

import guidance.features.calibration as calibration
from guidance import AnalyticGMMFlow, MeasurementFidelity
from guidance.features.calibration import (DEFAULT_CRW, CRWTable, calibrate, crw_cache_dir, crw_key, load_crw,
                                  model_identity)
from guidance.methods.flair import flair, flair_grid
from guidance.backbones.sd3 import SD3Model
from operators import make_operator

LAMBDAS = torch.linspace(0.05, 2.0, 16, dtype=torch.float64)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSTEER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "crw"


def gaussian_flow(scale=1.0) -> AnalyticGMMFlow:
    """One Gaussian N(0.1, diag(λ)) on 1x4x4 images: MSE(s) = mean_i λ_i / ((1 − s)² λ_i + s²) exactly."""
    return AnalyticGMMFlow([1.0], torch.full((1, 16), 0.1, dtype=torch.float64),
                           torch.diag(scale * LAMBDAS)[None], (1, 4, 4))


def exact_mse(s: float, lambdas=LAMBDAS) -> float:
    return float((lambdas / ((1 - s) ** 2 * lambdas + s**2)).mean())


def test_measured_mse_matches_the_closed_form():
    flow = gaussian_flow()
    images = flow.sample_prior(1024, _gen(0))
    table = calibrate(flow, images, num_points=12, generator=_gen(1), batch_size=512, progress=False, save=False)
    grid = torch.linspace(1, 0, 12, dtype=torch.float64)
    torch.testing.assert_close(table.sigmas, grid)
    # the s = 0 point is measured at s = 1e-3 (documented), where the closed form is ~1
    expected = torch.tensor([exact_mse(max(s, 1e-3)) for s in grid.tolist()], dtype=torch.float64)
    torch.testing.assert_close(table.mse, expected, rtol=0.06, atol=0)
    inverse = 1 / table.mse
    torch.testing.assert_close(table.weights, 0.5 * inverse / inverse.mean())
    assert abs(table.weights.mean().item() - 0.5) < 1e-12
    assert table.metadata["kind"] == "calibrated" and table.metadata["num_images"] == 1024


def test_table_is_cached_and_used_automatically(private_cache):
    flow = gaussian_flow()
    table = calibrate(flow, flow.sample_prior(64, _gen(0)), num_points=20, generator=_gen(1), progress=False)
    files = list(private_cache.glob("*.json"))
    assert len(files) == 1 and files[0].name == f"{crw_key(flow, None, 4, 4)}.json"
    loaded = load_crw(flow, None, 4, 4)
    torch.testing.assert_close(loaded.weights, table.weights, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mse, table.mse, rtol=0, atol=0)

    op = make_operator("inpaint_box:fraction=0.25", noise_std=0.05)
    x = flow.sample_prior(2, _gen(2))
    objective = MeasurementFidelity(op, op.measure(x, _gen(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "calibration is advised" warning now
        out = flair(flow, objective, num_steps=6, generator=_gen(4), progress=False)
    assert out.info["crw_origin"] == "cache"
    assert out.info["weights"] == [table(s) for s in flair_grid(6, 0.18).tolist()]

    other = gaussian_flow(scale=1.5)  # a different model: no table, the default and a warning
    assert load_crw(other, None, 4, 4) is None
    with pytest.warns(UserWarning, match="calibrate"):
        out = flair(other, objective, num_steps=2, generator=_gen(4), progress=False)
    assert out.info["crw"] is DEFAULT_CRW


def test_cache_key_separates_models_guidance_and_size(private_cache):
    flow = gaussian_flow()
    assert model_identity(flow) == model_identity(gaussian_flow())
    assert model_identity(flow)["fingerprint"] != model_identity(gaussian_flow(2.0))["fingerprint"]
    cfg2, cfg5 = SimpleNamespace(guidance_scale=2.0), SimpleNamespace(guidance_scale=5.0)
    keys = {crw_key(flow, None, 4, 4), crw_key(flow, cfg2, 4, 4), crw_key(flow, cfg5, 4, 4), crw_key(flow, cfg2, 8, 8)}
    assert len(keys) == 4
    assert "-g2-4x4" in crw_key(flow, cfg2, 4, 4)

    # a size never calibrated falls back to the nearest calibrated area of the same model and guidance
    small, large = CRWTable.constant(0.1), CRWTable.constant(0.2)
    small.save(private_cache / f"{crw_key(flow, cfg2, 8, 8)}.json")
    large.save(private_cache / f"{crw_key(flow, cfg2, 64, 64)}.json")
    assert load_crw(flow, cfg2, 48, 48)(0.5) == 0.2
    assert load_crw(flow, cfg2, 8, 8)(0.5) == 0.1
    assert load_crw(flow, cfg5, 8, 8) is None


def test_cache_folder_setting(tmp_path, monkeypatch):
    assert crw_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert crw_cache_dir() == tmp_path / "cache" / "crw"
    monkeypatch.delenv("FLOWSTEER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert crw_cache_dir() == tmp_path / "home" / ".cache" / "flowsteer" / "crw"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t" / "table.json"
    CRWTable.constant(0.4).save(path)
    before = path.read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(calibration.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        CRWTable.constant(0.9).save(path)
    assert path.read_text() == before  # the old table is intact
    assert sorted(os.listdir(path.parent)) == ["table.json"]  # and no partial file is left
    with pytest.raises(OSError):
        CRWTable.constant(0.9).save(tmp_path / "t" / "new.json")
    assert sorted(os.listdir(path.parent)) == ["table.json"]


def test_table_lookup_roundtrip_and_validation(tmp_path):
    sigmas = torch.linspace(1, 0, 100, dtype=torch.float64)
    table = CRWTable(sigmas, torch.arange(100, dtype=torch.float64) / 100, metadata={"kind": "test"})
    for s in (0.984, 0.77, 0.5011, 0.196, 0.18, 0.0, 1.0):
        assert table(s) == round((1 - s) * 99) / 100  # the nearest of the 100 points
    assert table(torch.tensor(0.77)) == table(0.77)
    loaded = CRWTable.load(table.save(tmp_path / "a.json"))
    assert torch.equal(loaded.weights, table.weights) and loaded.metadata == {"kind": "test"} and loaded.mse is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "flowsteer-crw-1", "sigmas": [1, 0], "weights": [0.5]}))
    with pytest.raises(ValueError, match="not a valid CRW table"):
        CRWTable.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid CRW table"):
        CRWTable.load(bad)
    with pytest.raises(ValueError, match=">= 0"):
        CRWTable(sigmas[:2], torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="constant CRW weight"):
        CRWTable.constant(-1.0)
    with pytest.raises(ValueError, match="MSE"):
        CRWTable.from_mse(sigmas[:2], torch.tensor([1.0, 0.0]))


def test_default_table_has_the_reference_shape_without_over_relaxation():
    grid = flair_grid(50, 0.18).tolist()
    w = [DEFAULT_CRW(s) for s in grid]
    peak = grid[max(range(50), key=w.__getitem__)]
    assert abs(peak - 0.77) < 0.03
    assert 0.19 < min(w) and max(w) < 0.49
    assert max(wi / s for wi, s in zip(w, grid)) <= 1.0 + 1e-9
    # the SD3.5-medium reference, scaled by 1/1.51: w/s reaches 1 at the last step
    assert abs(w[-1] / grid[-1] - 1) < 0.02


def test_calibrate_a_tiny_sd3_with_cfg(private_cache):
    model = SD3Model(sd3_pipeline())
    cond = model.condition(PROMPT, "", 2.0)
    images = torch.rand(2, 3, 32, 32, generator=_gen(0)) * 2 - 1
    table = calibrate(model, images, cond, num_points=3, generator=_gen(1), batch_size=1, progress=False)
    assert len(table) == 3 and torch.isfinite(table.weights).all() and (table.mse > 0).all()
    assert table.metadata["guidance"] == "2" and (table.metadata["height"], table.metadata["width"]) == (32, 32)
    assert load_crw(model, cond, 32, 32) is not None
    assert load_crw(model, model.condition(PROMPT, "", 5.0), 32, 32) is None
    assert all(p.grad is None for p in model.transformer.parameters())
    again = calibrate(model, images, cond, num_points=3, generator=_gen(1), batch_size=2, progress=False, save=False)
    torch.testing.assert_close(again.mse, table.mse, rtol=1e-4, atol=0)  # batching does not change the result


@pytest.mark.parametrize("images, options, message", [
    (torch.zeros(1, 4, 4), {}, r"\(B, C, H, W\)"),
    (torch.zeros(1, 3, 4, 4), {}, "channels"),
    (torch.full((1, 1, 4, 4), float("nan")), {}, "NaN"),
    (torch.zeros(1, 1, 4, 4), {"num_points": 1}, "num_points"),
    (torch.zeros(1, 1, 4, 4), {"batch_size": 0}, "batch_size"),
    (torch.zeros(1, 1, 4, 4), {"cond": SimpleNamespace(batch_size=2)}, "one condition"),
])
def test_calibrate_bad_input(images, options, message):
    with pytest.raises(ValueError, match=message):
        calibrate(gaussian_flow(), images, progress=False, save=False, **options)
