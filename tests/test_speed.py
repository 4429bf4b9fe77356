"""The speed benchmark and the fast paths it measures. Behaviour only, never timings: the command writes its
table and JSON with ratios to unguided sampling, refuses full-size backbones without a GPU, and every fast path
(cached embeddings, batched CFG, batched seeds, torch.compile, VAE tiling) gives what the plain path gives."""

import json
import re
import time

import pytest
import torch
from tiny_models import NEGATIVE, PROMPT, measured_fidelity, sd3_pipeline, tiny_taesd

from guidance import get_method
from tasks.random_models import common as random_common, flux as random_flux, sd3 as random_sd3
from guidance.backbones.flux import FluxCondition, FluxModel
from guidance.backbones.sd3 import SD3Condition, SD3Model
from tasks.commands.speed import Cell, CellSkipped, Settings, measure_cell


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the command ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_speed_command_writes_table_and_json_with_ratios(cli, tmp_path, monkeypatch):
    """Each cell runs in a fresh process; unguided is added as the reference; NFE counts network calls."""
    monkeypatch.setenv("FLOWSTEER_DEFAULT_MODEL", str(tmp_path / "no-default-model"))
    out = tmp_path / "speed"
    code, stdout, stderr = cli("speed", "--backbones", "tiny-sd3,default", "--methods", "flowchef-latent,pnp_flow",
                               "--sizes", "32", "--steps", "2", "--repeats", "1", "--out", out, "--quiet")
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert stdout.startswith(table.rstrip("\n").split("\n")[0])
    assert "× unguided" in table and "## Targets" in table and "computed once per prompt" in table
    assert "| CPU s / image |" in table  # measured in each cell's own process

    rows = {(r["backbone"], r["method"]): r for r in results["rows"]}
    assert [r["method"] for r in results["rows"] if r["backbone"] == "tiny-sd3"] == [
        "unguided", "flowchef-latent", "pnp_flow"]
    unguided = rows["tiny-sd3", "unguided"]
    assert unguided["status"] == "measured"
    assert unguided["ratios"]["time"] == 1.0 and unguided["ratios"]["peak_memory"] == 1.0
    assert unguided["ratios"]["nfe"] == 1.0
    assert unguided["nfe"] == 2 and rows["tiny-sd3", "flowchef-latent"]["nfe"] == 2  # one call per step
    assert rows["tiny-sd3", "pnp_flow"]["nfe"] == 4 and rows["tiny-sd3", "pnp_flow"]["ratios"]["nfe"] == 2.0
    for row in rows.values():
        if row["status"] == "measured":
            assert row["seconds_per_image"] > 0 and row["peak_memory_gib"] > 0 and row["cpu_seconds_per_image"] > 0
            assert row["memory_kind"] == "process RSS high-water mark" and len(row["seconds"]) == 1
    assert rows["default", "unguided"]["status"] == "not measured"
    assert "default model is not installed" in rows["default", "unguided"]["reason"]
    assert "| flowchef-latent | 32 | 2 |" in table and "not measured: the default model" in table
    env = results["environment"]
    assert {"date", "device_name", "torch", "diffusers", "torch_threads"} <= set(env)
    assert any(t["method"] == "flowchef-latent" and t["limit"] == 1.05 for t in results["targets"])


def test_full_size_backbones_are_refused_without_a_gpu(cli, tmp_path):
    code, _, stderr = cli("speed", "--backbones", "tiny-sd3,flux-dev", "--device", "cpu", "--out", tmp_path / "s")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "flux-dev needs a CUDA GPU" in stderr
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="CUDA GPU only"):
        random_sd3.sd35_medium_transformer(1.0, "cpu")


def test_cells_in_process_and_sizes_the_backbone_cannot_take(sd3):
    """The in-process path (what runs on CUDA) gives a row; a side beyond SD3's position embedding is a size skip."""
    settings = Settings("cpu", "float32", repeats=2)
    row = measure_cell(sd3, sd3.condition(PROMPT, NEGATIVE, 5.0), Cell("tiny-sd3", "flowchef-pixel", 32, 2), settings)
    assert row["status"] == "measured" and row["nfe"] == 2 and len(row["seconds"]) == 2
    assert sd3.max_size == 96 * 8  # pos_embed_max_size patches of 1 latent pixel, 8 image pixels each
    with pytest.raises(CellSkipped, match="size too large") as error:
        measure_cell(sd3, None, Cell("tiny-sd3", "unguided", 1024, 2), settings)
    assert error.value.scope == "size"


def test_default_backbone_gets_a_tiny_decoder_of_its_own_factor(offline_cache, tmp_path, monkeypatch):
    """An installed default model (here a stand-in folder with an f = 4 VAE) is loaded by name; the tiny decoder
    has the VAE's factor and is no wider than its narrowest level."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from tiny_models import tiny_unet

    from guidance.backbones.default import write_manifest
    from tasks.commands.speed import open_backbone

    folder = tmp_path / "default_model"
    tiny_unet(4).save_pretrained(folder / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=1,
                  sample_size=32).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FlowPipeline", "unet": ["diffusers", "UNet2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    write_manifest(folder)
    monkeypatch.setenv("FLOWSTEER_DEFAULT_MODEL", str(folder))

    settings = Settings("cpu", "float32", repeats=1)
    model, cond, info = open_backbone("default", settings)
    decoder = model.codec.decoder
    assert cond is None and info["decoder"] == "AutoencoderTiny (tiny)" and info["adapter"] == "GenericFlowModel"
    assert decoder.config.decoder_block_out_channels == (4, 4, 4) and model.codec.spatial_factor == 4
    row = measure_cell(model, cond, Cell("default", "flowchef-pixel", 32, 2), settings)
    assert row["status"] == "measured" and row["nfe"] == 2



def test_editors_are_timed_on_text_models_and_refused_on_text_free_ones(sd3, tmp_path):
    """FlowEdit, RF-Inversion and RF-Solver editing in a miniature run (tiny SD3, 32 px, 2 steps): each edits the
    smooth random image between the two prompts, its NFE ratio to unguided that of its loop (FlowEdit 2 per edited
    step over its default n_max of the N steps, RF-Inversion 2N, RF-Solver editing 4N); a backbone without text
    gives the row its reason. A batch of two images runs too (RF-Solver editing takes no generator)."""
    from guidance.methods.flowedit import default_n_max
    from tasks.commands.speed import EDIT_PROMPTS, run_speed

    editors = ["flowedit", "rf_inversion", "rf_solver_edit"]
    results = run_speed(["tiny-sd3", "tiny-pixel"], editors, [32], [2], repeats=1, out=tmp_path / "speed",
                        progress=False, isolate=False)
    rows = {(r["backbone"], r["method"]): r for r in results["rows"]}
    assert all(rows["tiny-sd3", m]["status"] == "measured" for m in ["unguided", *editors])
    n_max = default_n_max(sd3, 2)
    assert n_max == 1  # 33/50 of the 2 steps, rounded half up (the CFG family's published share)
    nfe = {m: rows["tiny-sd3", m]["nfe"] for m in ["unguided", *editors]}
    assert nfe == {"unguided": 2, "flowedit": 2 * n_max, "rf_inversion": 2 * 2, "rf_solver_edit": 4 * 2}
    assert [rows["tiny-sd3", m]["ratios"]["nfe"] for m in editors] == [n_max, 2.0, 4.0]
    assert rows["tiny-pixel", "unguided"]["status"] == "measured"
    for method in editors:
        row = rows["tiny-pixel", method]
        assert row["status"] == "not measured"
        assert row["reason"].startswith("needs a text-conditioned model")
        assert "tiny-pixel takes no text" in row["reason"]
    table = (tmp_path / "speed" / "table.md").read_text()
    assert "| flowedit | 32 | 2 | not measured: needs a text-conditioned model" in table
    assert repr(EDIT_PROMPTS[0]) in table and repr(EDIT_PROMPTS[1]) in table

    settings = Settings("cpu", "float32", batch_size=2, repeats=1)
    for method in editors:
        row = measure_cell(sd3, None, Cell("tiny-sd3", method, 32, 2), settings)
        assert row["status"] == "measured" and row["nfe"] == nfe[method]


# -- fast paths equal plain paths ----------------------------------------------------------------------------
def test_cached_embeddings_are_reused_and_equal_fresh_ones(sd3):
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    assert sd3.condition(PROMPT, NEGATIVE, 5.0) is cond
    fresh = SD3Model(sd3.pipeline).condition(PROMPT, NEGATIVE, 5.0)  # a new adapter: an empty cache
    assert fresh is not cond
    x = torch.randn(1, 4, 4, 4, generator=_gen(0))
    assert torch.equal(sd3.velocity(x, 0.7, cond), sd3.velocity(x, 0.7, fresh))


def test_batched_cfg_equals_separate_calls(sd3, flux):
    """SD3: one call on [negative, positive]; Flux true CFG: one call on [positive, negative]; both equal
    v_u + w (v_c - v_u) from two unguided calls."""
    x = torch.randn(2, 4, 4, 4, generator=_gen(1))
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    v_c = sd3.velocity(x, 0.6, SD3Condition(cond.prompt_embeds, cond.pooled_prompt_embeds, None, None, 1.0))
    v_u = sd3.velocity(x, 0.6, SD3Condition(cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds,
                                            None, None, 1.0))
    torch.testing.assert_close(sd3.velocity(x, 0.6, cond), v_u + 5.0 * (v_c - v_u), rtol=0, atol=1e-5)

    x = torch.randn(2, 4, 8, 8, generator=_gen(2))
    cond = flux.condition(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.5, max_sequence_length=32)
    assert cond.do_true_cfg
    g = cond.guidance_scale
    v_c = flux.velocity(x, 0.6, FluxCondition(cond.prompt_embeds, cond.pooled_prompt_embeds, g))
    v_u = flux.velocity(x, 0.6, FluxCondition(cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds, g))
    torch.testing.assert_close(flux.velocity(x, 0.6, cond), v_u + 2.5 * (v_c - v_u), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["unguided", "flowchef"])
def test_a_batch_of_seeds_equals_each_seed_alone(sd3, method):
    objective = measured_fidelity("sr:factor=4", 32)
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    run = get_method(method)
    common = dict(num_steps=3, cond=cond, height=32, width=32, progress=False)
    both = run(sd3, objective, generator=[_gen(11), _gen(12)], batch_size=2, **common)
    for i, seed in enumerate((11, 12)):
        alone = run(sd3, objective, generator=_gen(seed), batch_size=1, **common)
        torch.testing.assert_close(both.x[i:i + 1], alone.x, rtol=0, atol=1e-5)
        torch.testing.assert_close(both.image[i:i + 1], alone.image, rtol=0, atol=1e-5)
    assert both.nfe == 3  # the batch is one call per step


def test_regional_compile_gives_the_eager_velocity():
    model = SD3Model(sd3_pipeline())
    cond = model.condition(PROMPT, NEGATIVE, 5.0)
    x = torch.randn(1, 4, 4, 4, generator=_gen(3))
    eager = model.velocity(x, 0.5, cond)
    assert model.compile(regional=True) is model
    assert all(block._compiled_call_impl is not None for block in model.transformer.transformer_blocks)
    assert model.transformer._compiled_call_impl is None  # the blocks, not the whole model
    begin = time.perf_counter()
    try:
        compiled = model.velocity(x, 0.5, cond)
    except Exception as error:  # no working compiler toolchain here
        pytest.skip(f"torch.compile does not work on this machine: {type(error).__name__}: {error}")
    if time.perf_counter() - begin > 60:
        pytest.skip("torch.compile took over 60 s on this machine; the comparison is left to faster machines")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    whole = SD3Model(sd3_pipeline()).compile(regional=False)
    assert whole.transformer._compiled_call_impl is not None


def _smooth_latent(channels: int, side: int, seed: int) -> torch.Tensor:
    coarse = torch.randn(1, channels, side // 4, side // 4, generator=_gen(seed))
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic")


def _count_calls(module: torch.nn.Module, calls: list):
    return module.register_forward_hook(lambda *_: calls.append(1))


def test_vae_tiling_decodes_on_tiles_close_to_the_whole_image():
    """The tiny decoder (local receptive field) tiles almost exactly. A random-weight KL VAE does not (its group
    norms see only a tile and its mid-block attention the whole latent), so for it only the tiling itself is
    checked; trained VAEs tile with small seams."""
    model = SD3Model(sd3_pipeline(), decoder=tiny_taesd())
    z = _smooth_latent(4, 32, 4)
    whole = model.decode(z)
    calls = []
    hook = _count_calls(model.codec.decoder.decoder, calls)
    assert model.enable_vae_tiling(tile_size=128, overlap=0.25) is model
    tiled = model.decode(z)
    hook.remove()
    assert len(calls) == 9  # 32 latent pixels in tiles of 16 every 12: 3 x 3 tiles
    assert tiled.shape == whole.shape
    assert (tiled - whole).norm() / whole.norm() < 0.02
    model.disable_vae_tiling()
    assert torch.equal(model.decode(z), whole)

    vae_model = SD3Model(sd3_pipeline())
    whole = vae_model.decode(z)
    vae_model.enable_vae_tiling(tile_size=256)  # one tile covers the latent: the untiled path
    assert torch.equal(vae_model.decode(z), whole)
    calls = []
    hook = _count_calls(vae_model.codec.decoder.decoder, calls)
    vae_model.enable_vae_tiling(tile_size=128, overlap=0.25)
    tiled = vae_model.decode(z)
    hook.remove()
    assert len(calls) == 9 and tiled.shape == whole.shape and bool(torch.isfinite(tiled).all())
    with pytest.raises(ValueError, match="multiple of the autoencoder's factor 8"):
        vae_model.enable_vae_tiling(tile_size=100)
    with pytest.raises(ValueError, match="less than one latent pixel"):
        vae_model.enable_vae_tiling(tile_size=32, overlap=0.1)


# -- full-size architectures and their miniatures ------------------------------------------------------------
def test_full_size_configs_and_parameter_counts():
    """The released configs at scale 1, counted on the meta device (no memory): SD3.5-medium 2.24B transformer
    parameters (+ its 384 x 384 position-embedding buffer), FLUX.1-dev 11.9B."""
    sd35 = random_sd3.sd35_medium_config(1.0)
    assert sd35 == random_sd3.SD35_MEDIUM_TRANSFORMER and sd35["dual_attention_layers"] == tuple(range(13))
    assert random_flux.flux_dev_config(1.0) == random_flux.FLUX_DEV_TRANSFORMER
    assert random_common.text_widths(1.0) == (768, 1280, 4096) and sd35["pooled_projection_dim"] == 768 + 1280
    assert 2.2e9 < random_common.parameter_count(random_sd3.sd35_medium_transformer(1.0, "meta")) < 2.3e9
    assert 11.8e9 < random_common.parameter_count(random_flux.flux_dev_transformer(1.0, "meta")) < 12.0e9
    assert 83e6 < random_common.parameter_count(random_common.vae16(1.0, 0.0, 1.0, "meta")) < 85e6
    with pytest.raises(ValueError, match="scale must be a number in"):
        random_sd3.sd35_medium_config(0)


def test_miniatures_of_the_full_size_builders_run_through_the_adapters():
    scale = 1 / 16
    components = random_sd3.sd35_medium_components(scale, "cpu", torch.float32)
    decoder = random_common.taesd16(random_common.SD3_VAE_SCALE, random_common.SD3_VAE_SHIFT, scale)
    sd35 = SD3Model.from_components(decoder=decoder, **components)
    config = sd35.transformer.config
    assert (config.num_layers, config.num_attention_heads, config.dual_attention_layers) == (2, 2, (0,))
    assert sd35.max_size == 384 * 16 and sd35.size_multiple == 16
    cond = sd35.condition(PROMPT, NEGATIVE, 7.0)
    assert cond.prompt_embeds.shape[-1] == config.joint_attention_dim == 256
    assert cond.pooled_prompt_embeds.shape[-1] == config.pooled_projection_dim == 48 + 80
    x = torch.randn(1, 16, 8, 8, generator=_gen(5))
    v = sd35.velocity(x, 0.5, cond)
    assert v.shape == x.shape and bool(torch.isfinite(v).all())
    assert sd35.decode(x).shape == (1, 3, 64, 64)
    bf16 = random_sd3.sd35_medium_transformer(scale, "cpu", torch.bfloat16)  # built in bf16 directly, as on a GPU
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} == {bf16.pos_embed.pos_embed.dtype}
    assert torch.get_default_dtype() == torch.float32

    flux = FluxModel.from_components(**random_flux.flux_dev_components(scale, "cpu", torch.float32))
    config = flux.transformer.config
    assert (config.num_layers, config.num_single_layers, config.guidance_embeds) == (1, 2, True)
    cond = flux.condition(PROMPT, max_sequence_length=32)
    v = flux.velocity(x, 0.5, cond)
    assert v.shape == x.shape and bool(torch.isfinite(v).all())
    assert flux.sigmas(4, 64, 64)[0] == 1.0 and flux.decode(x).shape == (1, 3, 64, 64)


def test_rows_are_written_as_they_come_and_a_time_budget_leaves_the_rest_unmeasured(tmp_path):
    """results.json is rewritten after every row (a run stopped part-way keeps what finished); a cell whose estimate
    does not fit in what is left of the budget says so; row options reach the method; in-process CPU cells share
    one RSS mark; each CPU row has its CPU time beside its wall time, in the JSON and the table."""
    from tasks.commands.speed import run_speed

    out = tmp_path / "speed"
    seen = []

    def on_row(results):
        seen.append(len(results["rows"]))
        assert len(json.loads((out / "results.json").read_text())["rows"]) == len(results["rows"])

    results = run_speed(["tiny-sd3"], ["flair"], [32], [2], repeats=1, out=out, progress=False, isolate=False,
                        options={"flair": {"data_steps": 1}}, on_row=on_row)
    assert seen == [1, 2] and [r["status"] for r in results["rows"]] == ["measured", "measured"]
    flair = results["rows"][1]
    assert flair["warmup_steps"] == 2 and flair["nfe"] == 2
    table = (out / "table.md").read_text()
    assert results["settings"]["options"] == {"flair": {"data_steps": 1}} and "flair: data_steps=1" in table
    assert "this one process" in " ".join(results["notes"])
    for row in results["rows"]:
        assert len(row["cpu_seconds"]) == 1 and row["cpu_seconds_per_image"] == row["cpu_seconds"][0] > 0
        assert row["cell_seconds"] > 0 and row["estimated_seconds"] > 0
    assert results["rows"][0]["ratios"]["cpu_time"] == 1.0 and flair["ratios"]["cpu_time"] > 0
    assert "| s / image | × unguided | CPU s / image | × unguided | peak GiB |" in table
    assert f"| flair | 32 | 2 | {flair['seconds_per_image']:.4g} | {flair['ratios']['time']:.3g} | " \
           f"{flair['cpu_seconds_per_image']:.4g} |" in table and "time.process_time" in table

    late = run_speed(["tiny-sd3"], ["flowchef-latent"], [32], [2], repeats=1, out=tmp_path / "late", progress=False,
                     isolate=False, time_budget=1e-9)
    assert [r["status"] for r in late["rows"]] == ["not measured"] * 2
    assert all(r["reason"].startswith("the time budget of 1e-09 s had 0 s left, less than the estimated ")
               and r["reason"].endswith(" s of opening tiny-sd3 and its first cell") for r in late["rows"])
    with pytest.raises(ValueError, match="--option given for 'dps', which is not among the rows"):
        run_speed(["tiny-sd3"], ["flair"], [32], [2], out=tmp_path / "bad", options={"dps": {"step_size": 1.0}})
    with pytest.raises(ValueError, match="--time-budget takes a positive number"):
        run_speed(["tiny-sd3"], ["flair"], [32], [2], out=tmp_path / "bad", time_budget=0)
    with pytest.raises(ValueError, match="method 'flair' has no option"):
        run_speed(["tiny-sd3"], ["flair"], [32], [2], out=tmp_path / "bad2", isolate=False, repeats=1,
                  options={"flair": {"nonsense": 1}})
    assert not (tmp_path / "bad2").exists()  # refused before anything was written


def test_a_cell_starts_only_if_its_estimate_fits_and_the_garbage_walk_skips_what_was_there(tmp_path, monkeypatch):
    """With a budget, a cell whose estimate (rescaled by the run so far) is above what is left is skipped and a
    cheaper cell after it still runs. The collections after each cell walk only what the run allocated: everything
    that existed before it is frozen (checked failing by removing the gc.freeze from run_speed)."""
    import gc

    from tasks.commands.speed import Estimator, run_speed

    prior = Estimator.cell_seconds
    monkeypatch.setattr(Estimator, "cell_seconds",
                        lambda self, cell, recompile=False: 1e6 if cell.method == "dps" else prior(self, cell))
    frozen, collect = [], gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: frozen.append(gc.get_freeze_count()) or collect(*a))
    before = len(gc.get_objects())
    results = run_speed(["tiny-sd3"], ["dps", "flowchef-latent"], [32], [2], repeats=1, out=tmp_path / "s",
                        progress=False, isolate=False, time_budget=3600)
    rows = {r["method"]: r for r in results["rows"]}
    assert [r["method"] for r in results["rows"]] == ["unguided", "dps", "flowchef-latent"]
    assert rows["unguided"]["status"] == rows["flowchef-latent"]["status"] == "measured"
    assert rows["dps"]["status"] == "not measured"
    assert re.fullmatch(r"the time budget of 3600 s had \d+ s left, less than the estimated \S+ s of this cell",
                        rows["dps"]["reason"]), rows["dps"]["reason"]
    assert len(frozen) >= 2 and min(frozen) >= before // 2 and gc.get_freeze_count() == 0


def test_estimates_follow_the_work_of_each_cell():
    """The prior estimates: DPS (a backward pass per step) above FlowChef, Qwen-Image 20B with CFG above
    SD3.5-medium, fewer FLAIR data steps cheaper, compiling adds its seconds, a fresh process per CPU cell adds its
    start; a whole run is its backbones' opening and its cells."""
    from tasks.commands.speed import Cell, Estimator, estimate_speed

    plain = Estimator(repeats=1)
    dps, chef = (plain.cell_seconds(Cell("sd3.5-medium", m, 1024, 28)) for m in ("dps", "flowchef-latent"))
    assert 2.5 < dps / chef < 3.5
    assert plain.cell_seconds(Cell("qwen-image", "unguided", 1024, 28)) > 5 * chef
    five = Estimator(repeats=1, options={"flair": {"data_steps": 5}}).cell_seconds(Cell("sd3.5-medium", "flair",
                                                                                         1024, 28))
    assert chef < five < plain.cell_seconds(Cell("sd3.5-medium", "flair", 1024, 28))
    compiled = Estimator(repeats=1, compile="regional")
    assert compiled.open_seconds("flux-dev") == plain.open_seconds("flux-dev") + 60
    assert Estimator(spawn=True).cell_seconds(Cell("tiny-sd3", "unguided", 32, 2)) > \
        8 + Estimator().cell_seconds(Cell("tiny-sd3", "unguided", 32, 2))
    run = estimate_speed(["sd3.5-medium"], ["dps"], [512, 1024], [28], repeats=1, device="cuda", out="ignored")
    assert run == pytest.approx(plain.open_seconds("sd3.5-medium") + sum(
        plain.cell_seconds(Cell("sd3.5-medium", m, s, 28)) for s in (512, 1024) for m in ("unguided", "dps")))
    with pytest.raises(TypeError, match="'memory_budget' is not one of them"):
        estimate_speed(["tiny-sd3"], memory_budget=1)
    with pytest.raises(ValueError, match="unknown backbone 'sd35'"):
        estimate_speed(["sd35"])


def test_full_size_backbones_run_without_divergence_checks_and_flair_has_an_absolute_target():
    from tasks.commands.speed import check_targets, cell_options

    settings = Settings("cuda", "bfloat16", options={"flair": {"data_steps": 5}})
    assert cell_options(Cell("sd3.5-medium", "dps", 768, 28), settings) == {"check_divergence": False}
    assert cell_options(Cell("tiny-sd3", "dps", 32, 2), settings) == {}
    assert cell_options(Cell("flux-dev", "flair", 768, 28), settings)["data_steps"] == 5
    row = {"backbone": "sd3.5-medium", "method": "flair", "size": 768, "steps": 28, "status": "measured",
           "seconds_per_image": 3.5, "ratios": {"time": 1.2}}
    (target,) = [t for t in check_targets([row], [], settings) if "4 s per image" in t["target"]]
    assert target["met"] and target["limit"] == 4.0 and target["note"] == "data_steps 5"


def test_a_size_the_backbone_cannot_take_is_refused_before_anything_runs(cli, tmp_path):
    code, _, stderr = cli("speed", "--backbones", "tiny-flux", "--sizes", "70", "--steps", "2", "--out",
                          tmp_path / "s")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "--sizes 70: tiny-flux takes image sides that are multiples of 16 (e.g. 64 or 80)" in stderr
    assert not (tmp_path / "s").exists()
