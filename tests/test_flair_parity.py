"""FLAIR's official setup: the shipped weight tables, TAESD3 as encoder and decoder, and the presets run end to end
by ``flowsteer benchmark --preset`` (prs-eth/FLAIR at commit c4f55f7: configs/x12.yaml, LCFM/*.npy)."""

import hashlib
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tiny_models import PROMPT, sd3_pipeline, tiny_taesd

from guidance import MeasurementFidelity, get_method
from guidance.features.calibration import (DEFAULT_CRW, OFFICIAL_TABLES, calibrate, load_crw, official_crw_name,
                                  official_crw_table, resolve_crw)
from guidance.loading.models import ModelNotFoundError, load_model
from guidance.methods.flair import PRESETS, flair_grid
from guidance.backbones.sd3 import SD3Model
from guidance.features.presets import get_preset
from operators import make_operator

# sha256 of the float32 arrays in the official files (np.load(...).astype("<f4").tobytes())
OFFICIAL_SHA256 = {
    "sd3.5-medium": "1c0dc7945c520107329111cf62ec5895afb579a4a6453ad4fb12250bd788096f",  # SD3_loss_v_MSE_DIV2k_neg_prompt
    "sd3.5-large": "eb2d6022a3189e73611fbb94d881de02e066a0bc4f2573657b96a795676d21c3",   # SD3.5-large_MSE_DIV2k
}
# configs/x12.yaml at c4f55f7, the values a run records
X12 = {"resolution": 768, "guidance": 2, "negative_prompt": "", "likelihood_steps": 15, "early_stopping": 1e-4,
       "optimizer_dataterm_lr": 12, "n_steps": 50, "ts_min": 0.18, "inv_alpha": "1-t", "seed": 3,
       "prompt": "a high quality photo of", "scale": 12, "noise_std": 0.01, "use_tiny_ae": True,
       "optimized_reg_weight": "LCFM/SD3_loss_v_MSE_DIV2k_neg_prompt.npy", "regularizer_weight": 0.5}


def _named(model, name: str):
    model.pipeline.register_to_config(_name_or_path=name)
    return model


@pytest.mark.parametrize("name", sorted(OFFICIAL_TABLES))
def test_shipped_tables_are_the_official_arrays(name):
    table = official_crw_table(name)
    assert hashlib.sha256(table.mse.float().numpy().astype("<f4").tobytes()).hexdigest() == OFFICIAL_SHA256[name]
    assert torch.equal(table.mse.float().double(), table.mse)  # float32 values, exactly
    inverse = 1 / (table.mse + 1e-7)
    torch.testing.assert_close(table.weights, 0.5 * inverse / inverse.mean(), rtol=1e-15, atol=0)
    torch.testing.assert_close(table.sigmas, torch.linspace(1, 0, 100, dtype=torch.float64))
    assert table.metadata["commit"].startswith("c4f55f7") and table.metadata["file"].startswith("LCFM/")


def test_the_medium_table_over_flairs_grid():
    table = official_crw_table("sd3.5-medium")
    grid = flair_grid(50, 0.18).tolist()
    weights = [table(s) for s in grid]
    assert weights[0] == pytest.approx(0.435, abs=5e-4)  # the official first weight
    peak = max(range(50), key=weights.__getitem__)
    assert weights[peak] == pytest.approx(0.7294, abs=1e-4) and grid[peak] == pytest.approx(0.775, abs=1e-3)
    assert weights[-1] / grid[-1] == pytest.approx(1.5126, abs=1e-3)  # over-relaxation at the last step
    # the default table for other models: the same shape, scaled so that w/s <= 1
    scaled = [DEFAULT_CRW(s) for s in grid]
    ratio = scaled[0] / weights[0]
    assert all(d == pytest.approx(ratio * w, rel=1e-12) for d, w in zip(scaled, weights))
    assert max(d / s for d, s in zip(scaled, grid)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name_or_path, scale, expected", [
    ("stabilityai/stable-diffusion-3.5-medium", 2.0, "sd3.5-medium"),
    ("stabilityai/stable-diffusion-3.5-large", 2.0, "sd3.5-large"),
    ("/models/stable-diffusion-3.5-large/", 2.0, "sd3.5-large"),      # a local copy keeps the name
    ("stabilityai/stable-diffusion-3.5-medium", 4.5, None),           # another CFG scale: calibrate
    ("stabilityai/stable-diffusion-3.5-large-turbo", 2.0, None),      # a distilled model is another model
    ("stabilityai/stable-diffusion-3-medium-diffusers", 2.0, None),
])
def test_load_picks_the_official_table_by_model_id(sd3, name_or_path, scale, expected, tmp_path):
    model = _named(SD3Model(sd3_pipeline()), name_or_path)
    cond = model.condition(PROMPT, "", scale)
    assert official_crw_name(model, cond) == expected
    table, origin = resolve_crw(None, model, cond, 32, 32, cache_dir=tmp_path)
    found = load_crw(model, cond, 32, 32, cache_dir=tmp_path)
    assert (found is None) == (expected is None)
    if expected:
        assert found.metadata["kind"] == "official" and torch.equal(found.weights, table.weights)
        assert origin == f"official:{expected}" and torch.equal(table.mse, official_crw_table(expected).mse)
    else:
        assert origin == "default" and table is DEFAULT_CRW


def test_a_calibrated_table_and_explicit_names_take_precedence(tmp_path):
    model = _named(SD3Model(sd3_pipeline()), "stabilityai/stable-diffusion-3.5-medium")
    cond = model.condition(PROMPT, "", 2.0)
    assert resolve_crw("sd3.5-large", model, cond, 32, 32, tmp_path)[1] == "official:sd3.5-large"
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mine = calibrate(model, images, cond, num_points=3, generator=torch.Generator().manual_seed(1),
                     cache_dir=tmp_path, progress=False)
    table, origin = resolve_crw(None, model, cond, 32, 32, tmp_path)
    assert origin == "cache" and torch.equal(table.weights, mine.weights)
    with pytest.raises(FileNotFoundError, match="no CRW table"):
        resolve_crw("sd3.5-small", model, cond, 32, 32, tmp_path)
    with pytest.raises(ValueError, match="sd3.5-large, sd3.5-medium"):
        official_crw_table("sd3.5-small")


def test_flair_uses_the_official_table_for_sd35_medium(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSTEER_CACHE", str(tmp_path))
    model = _named(SD3Model(sd3_pipeline()), "stabilityai/stable-diffusion-3.5-medium")
    op = make_operator("sr:factor=2", noise_std=0.01)
    y = op.measure(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                   torch.Generator().manual_seed(1))
    out = get_method("flair", data_steps=1)(model, MeasurementFidelity(op, y), num_steps=3,
                                            cond=model.condition(PROMPT, "", 2.0),
                                            generator=torch.Generator().manual_seed(2), progress=False)
    assert out.info["crw_origin"] == "official:sd3.5-medium"
    table = official_crw_table("sd3.5-medium")
    assert out.info["weights"] == [table(s) for s in flair_grid(3, 0.18).tolist()]


# -- TAESD3 as encoder and decoder --------------------------------------------------------------------------------
def test_an_encoder_replaces_the_vae_for_encoding():
    taesd = tiny_taesd()
    full = SD3Model(sd3_pipeline())
    both = SD3Model(sd3_pipeline(), decoder=taesd, encoder=taesd)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = both.encode(image)
        expected = (taesd.encode(image).latents - taesd.config.shift_factor) * taesd.config.scaling_factor
        torch.testing.assert_close(z, expected)
        assert not torch.allclose(z, full.encode(image), atol=1e-3)
        torch.testing.assert_close(both.decode(z), taesd.decode(z / taesd.config.scaling_factor
                                                                 + taesd.config.shift_factor).sample)
    assert set(map(id, both.codec.modules())) == {id(both.pipeline.vae), id(taesd)}


def test_an_encoder_must_fit_the_model():
    with pytest.raises(ValueError, match="encoder has 8 latent channels"):
        SD3Model(sd3_pipeline(), encoder=tiny_taesd(latent_channels=8))


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache holding tiny stand-ins under the official ids: SD3.5-medium and TAESD3."""
    cache = tmp_path / "hub"

    def plant(repo, save):
        folder = cache / f"models--{repo.replace('/', '--')}"
        save(folder / "snapshots" / ("0" * 40))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)

    plant("stabilityai/stable-diffusion-3.5-medium", lambda p: sd3_pipeline(sd35=True).save_pretrained(p))
    plant("madebyollin/taesd3", lambda p: tiny_taesd().save_pretrained(p))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWSTEER_CACHE", str(tmp_path / "flowsteer"))
    return cache


def test_load_model_shares_one_taesd3_for_encoder_and_decoder(hub_cache):
    model = load_model("stabilityai/stable-diffusion-3.5-medium", decoder="madebyollin/taesd3",
                       encoder="madebyollin/taesd3")
    assert type(model.codec.decoder).__name__ == "AutoencoderTiny" and model.codec.encoder is model.codec.decoder
    assert official_crw_name(model, model.condition(PROMPT, "", 2.0)) == "sd3.5-medium"


def test_missing_taesd3_says_how_to_go_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "sd3"
    sd3_pipeline().save_pretrained(folder)
    with pytest.raises(ModelNotFoundError, match=r"madebyollin/taesd3.*decoder.*decoder=None \(--decoder none\)"):
        load_model(str(folder), decoder="madebyollin/taesd3")


# -- the presets ----------------------------------------------------------------------------------------------------
def test_flair_presets_carry_the_official_configurations():
    sr = get_preset("flair_sr12")
    assert sr["options"] == {"sigma_min": X12["ts_min"], "data_steps": X12["likelihood_steps"],
                             "data_lr": X12["optimizer_dataterm_lr"], "dta": True, "crw": "sd3.5-medium"}
    assert (sr["num_steps"], sr["resolution"], sr["guidance_scale"], sr["negative_prompt"], sr["seed"],
            sr["prompt"], sr["noise_std"]) == (X12["n_steps"], X12["resolution"], X12["guidance"],
                                               X12["negative_prompt"], X12["seed"], X12["prompt"], X12["noise_std"])
    assert sr["decoder"] == sr["encoder"] == "madebyollin/taesd3" and sr["dtype"] == "bfloat16"
    assert sr["model"] == "stabilityai/stable-diffusion-3.5-medium"
    assert make_operator(sr["operators"][0]).factor == X12["scale"]
    faces = {name for name, p in PRESETS.items() if p["prompt"] == "a high quality photo of a face"}
    assert faces == {"flair_inpaint", "flair_motion_deblur"}
    assert {PRESETS[n]["seed"] for n in ("flair_inpaint", "flair_inpaint_div2k", "flair_motion_deblur")} == {42}
    for name, preset in PRESETS.items():
        assert "prs-eth/FLAIR at commit c4f55f7" in preset["source"] and "configs/" in preset["source"], name


def _photos(folder: Path, count: int = 2) -> Path:
    from tasks.outputs.image_io import save_image

    folder.mkdir()
    y, x = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    for i in range(count):
        save_image(torch.stack([x, y * (i + 1) / 2, x * y])[None] * 0.8, folder / f"photo{i}.png")
    return folder


@pytest.mark.slow
def test_benchmark_preset_reproduces_the_official_x12_setting(hub_cache, tmp_path):
    from tasks.commands.benchmark import run_benchmark

    images = _photos(tmp_path / "images")
    (tmp_path / "captions.txt").write_text("photo0.png: bloom, field\nphoto1.png: sky\n")
    result = run_benchmark(images, out=tmp_path / "out", preset="flair_sr12", size=48, device="cpu",
                           captions=tmp_path / "captions.txt", progress=False)
    settings = json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]
    assert settings["preset"]["name"] == "flair_sr12"
    assert settings["preset"]["overrides"] == {"size": {"preset": 768, "used": 48}}  # the only departure
    # every other setting recorded is the official configuration's value
    assert settings["model"] == "stabilityai/stable-diffusion-3.5-medium" and settings["dtype"] == "bfloat16"
    assert settings["decoder"] == settings["encoder"] == "madebyollin/taesd3"  # use_tiny_ae
    assert settings["steps"] == X12["n_steps"] and settings["seed"] == X12["seed"]
    assert settings["guidance_scale"] == X12["guidance"] and settings["negative_prompt"] == X12["negative_prompt"]
    assert settings["noise_std"] == X12["noise_std"] and settings["methods"] == ["flair"]
    assert settings["operators"] == ["sr:factor=12,padding=symmetric"]
    assert settings["prompts"] == {"photo0": "a high quality photo of bloom, field", "photo1": "a high quality photo of sky"}
    assert settings["options"]["flair"]["data_steps"] == X12["likelihood_steps"]
    assert settings["options"]["flair"]["sigma_min"] == X12["ts_min"] and settings["options"]["flair"]["dta"]
    for row in result.summary["items"]:
        assert row["status"] == "ok" and row["nfe"] == X12["n_steps"]
        item = json.loads((tmp_path / "out" / "items" / f"{row['item']}.json").read_text())["settings"]
        resolved = item["resolved"]
        assert resolved["data_lr"] == X12["optimizer_dataterm_lr"]
        assert resolved["crw_origin"] == "official:sd3.5-medium"
        assert resolved["threshold"] == pytest.approx(X12["early_stopping"] * 3 * 4 * 4)  # σ² · numel(y), y 4x4
        assert item["noise_std"] == X12["noise_std"] and item["num_steps"] == X12["n_steps"]
    table = official_crw_table("sd3.5-medium")
    assert table.metadata["file"] == X12["optimized_reg_weight"]
    assert float(table.weights.mean()) == pytest.approx(X12["regularizer_weight"], rel=1e-12)


def test_benchmark_preset_refuses_what_does_not_fit(hub_cache, tmp_path):
    from tasks.commands.benchmark import run_benchmark

    images = _photos(tmp_path / "images", 1)
    with pytest.raises(ValueError, match="flair setting; drop --methods"):
        run_benchmark(images, methods="dps", out=tmp_path / "a", preset="flair_sr12", progress=False)
    with pytest.raises(ValueError, match="no caption for 'photo0.png'"):
        (tmp_path / "captions.txt").write_text("other.png: sky\n")
        run_benchmark(images, out=tmp_path / "b", preset="flair_sr12", captions=tmp_path / "captions.txt",
                      progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        run_benchmark(images, out=tmp_path / "c", preset="flair_sr13", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flair_inpaint", "flair_motion_deblur"])
def test_benchmark_runs_the_other_flair_presets_as_published(hub_cache, tmp_path, name):
    from tasks.commands.benchmark import run_benchmark

    preset = get_preset(name)
    result = run_benchmark(_photos(tmp_path / "images", 1), out=tmp_path / "out", preset=name, size=48,
                           device="cpu", progress=False)
    settings = result.summary["settings"]
    assert settings["preset"]["overrides"] == {"size": {"preset": 768, "used": 48}}
    assert settings["operators"] == preset["operators"] and settings["seed"] == 42
    assert settings["prompt"] == "a high quality photo of a face" and settings["guidance_scale"] == 2.0
    (row,) = result.summary["items"]
    assert row["status"] == "ok" and row["nfe"] == 50
    item = json.loads((tmp_path / "out" / "items" / f"{row['item']}.json").read_text())["settings"]
    assert item["resolved"]["data_lr"] == 0.1 and item["resolved"]["crw_origin"] == "official:sd3.5-medium"


def test_a_preset_on_an_unconditional_model_runs_without_its_text_settings(tmp_path, offline_cache):
    from tasks.commands.benchmark import run_benchmark

    with pytest.warns(UserWarning, match="sets prompt, negative_prompt, guidance_scale, which 'default' does not take"):
        result = run_benchmark(_photos(tmp_path / "images", 1), out=tmp_path / "out", preset="flair_sr12",
                               model="default", decoder="none", encoder="none", dtype="float32", size=48,
                               num_steps=2, device="cpu", progress=False)
    settings = result.summary["settings"]
    assert settings["preset"]["not_applied"]["prompt"] == "a high quality photo of"
    assert "prompt" not in settings and "guidance_scale" not in settings
    assert set(settings["preset"]["overrides"]) == {"model", "decoder", "encoder", "dtype", "size", "num_steps"}
    assert result.summary["items"][0]["status"] == "ok"
    with pytest.raises(ValueError, match="takes no prompt"):  # text the user asks for is never dropped
        run_benchmark(_photos(tmp_path / "more", 1), out=tmp_path / "out2", preset="flair_sr12", model="default",
                      decoder="none", encoder="none", size=48, num_steps=2, device="cpu", progress=False,
                      prompt="a photo")
