"""Memory profiles (guidance.memory_profiles): every profile runs end to end on the CPU on the tiny SD3 and FLUX.1
pipelines, close to the "none" profile (offloading and checkpointing: float32 noise; int8: a stated tolerance);
int8 weight-only layers hold a quarter of float32's bytes; the profiles that cannot run here are refused in one
line; "auto" picks the lightest profile whose plan fits the free memory."""

import pytest
import torch
import torch.nn.functional as F

import guidance.memory
from guidance import MeasurementFidelity, get_method, load_model, sample
from guidance.memory_estimate import plan
from guidance.memory_profiles import PROFILES, Int8Linear, apply_profile, quantize_int8
from operators import make_operator
from tasks.random_models import tiny_pipeline

#: the largest difference of a decoded image ([-1, 1]) from the "none" profile's: offloading and checkpointing
#: reorder float32 sums at most; int8 weights (one scale per output row) move a tiny model's image by ~1e-3
CLOSE = {"none": 0.0, "balanced": 0.0, "low": 1e-5, "8bit": 1e-2, "minimal": 1e-2}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _unguided(model):
    cond = model.condition("a photo of a red fox", guidance_scale=4.0) if type(model).__name__ == "SD3Model" \
        else model.condition("a photo of a red fox")
    return sample(model, cond, num_steps=2, height=32, width=32, generator=_gen(), progress=False).image


def _dps(model):
    clean = torch.rand(1, 3, 32, 32, generator=_gen(1)) * 2 - 1
    operator = make_operator("sr:factor=2")
    return get_method("dps")(model, MeasurementFidelity(operator, operator(clean)), num_steps=2, height=32,
                             width=32, generator=_gen(), progress=False).image


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_profile_runs_on_the_cpu_close_to_none(family):
    reference = _unguided(load_model(tiny_pipeline(family), device="cpu"))
    for name in CLOSE:
        model = load_model(tiny_pipeline(family), memory=name, device="cpu")
        assert model.memory_profile == name
        difference = float((_unguided(model) - reference).abs().max())
        assert difference <= CLOSE[name], f"{name}: {difference}"


def test_checkpointed_and_quantised_profiles_backpropagate_through_the_network():
    """DPS differentiates through the transformer: gradient checkpointing ("low") gives the same result, int8
    weights a close one, and the int8 layers are what the graph runs through."""
    reference = _dps(load_model(tiny_pipeline("sd3"), device="cpu"))
    low = load_model(tiny_pipeline("sd3"), memory="low", device="cpu")
    assert low.transformer.is_gradient_checkpointing
    assert float((_dps(low) - reference).abs().max()) <= CLOSE["low"]
    quantised = load_model(tiny_pipeline("sd3"), memory="8bit", device="cpu")
    assert any(isinstance(m, Int8Linear) for m in quantised.transformer.modules())
    assert 0 < float((_dps(quantised) - reference).abs().max()) <= CLOSE["8bit"]


def test_int8_linear_stores_a_quarter_of_the_bytes_and_dequantises_within_half_a_step():
    layer = torch.nn.Linear(64, 32).requires_grad_(False)
    torch.nn.init.normal_(layer.weight, generator=_gen(2))
    quantised = Int8Linear(layer)
    scale = layer.weight.abs().amax(1, keepdim=True) / 127
    weight = quantised.weight_int8.float() * quantised.weight_scale
    assert quantised.weight_int8.dtype == torch.int8
    assert float(((weight - layer.weight) / scale).abs().max()) <= 0.5 + 1e-4  # rounding to the nearest step
    stored = sum(p.numel() * p.element_size() for p in quantised.parameters())
    assert stored == 64 * 32 + 4 * 32 + 4 * 32  # int8 weights, one float32 scale per row, the bias
    x = torch.randn(5, 64, generator=_gen(3))
    assert torch.allclose(quantised(x), F.linear(x, weight, layer.bias), atol=1e-6)


def test_quantisation_replaces_the_blocks_linear_layers_only_and_the_planner_counts_their_bytes():
    model = load_model(tiny_pipeline("flux"), device="cpu")
    transformer = model.transformer
    before = plan(model, "unguided", 32, 32, device="cpu", profile="8bit").weights["transformer"]
    replaced = quantize_int8(transformer)
    assert replaced > 0 and type(transformer.x_embedder) is torch.nn.Linear  # the embedder keeps its precision
    stored = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    assert stored == before  # the planner's 8bit bytes are the quantised model's exactly
    model.memory_profile = "8bit"
    assert plan(model, "unguided", 32, 32, device="cpu").weights["transformer"] == stored


def test_balanced_swaps_the_text_encoders_with_the_transformer_and_keeps_the_vae():
    """The text encoders and the transformer form a ring of offload hooks: each, when it runs, sends the one
    before it back to the CPU (the transformer the last text encoder, the first text encoder the transformer);
    the VAE has no hook and stays on the device."""
    model = load_model(tiny_pipeline("sd3"), memory="balanced", device="cpu")
    ring = [model.pipeline.text_encoder, model.pipeline.text_encoder_2, model.pipeline.text_encoder_3,
            model.transformer]
    previous = [module._hf_hook.prev_module_hook.model for module in ring]
    assert all(p is ring[i - 1] for i, p in enumerate(previous))
    assert not hasattr(model.pipeline.vae, "_hf_hook")
    assert model.pipeline.vae.use_slicing and model.pipeline.vae.use_tiling


def test_profiles_that_cannot_apply_are_refused_in_one_line():
    with pytest.raises(ValueError, match="'4bit' needs bitsandbytes and a CUDA GPU"):
        load_model(tiny_pipeline("sd3"), memory="4bit", device="cpu")
    with pytest.raises(ValueError, match="memory profile 'huge' is not one of none, balanced, low"):
        load_model(tiny_pipeline("sd3"), memory="huge")
    model = load_model(tiny_pipeline("sd3"))
    with pytest.raises(ValueError, match="a FlowModel is returned as it is; decoder, encoder, memory"):
        load_model(model, memory="low")
    default = load_model("default", memory="balanced", device="cpu")  # no text encoders: slicing and tiling
    assert default.memory_profile == "balanced" and default.codec.autoencoder.use_tiling
    with pytest.raises(ValueError, match="'low' offloads through the model's diffusers pipeline.*'balanced'"):
        apply_profile(load_model("default"), "low", "cpu")


def test_auto_picks_the_lightest_profile_that_fits_the_free_memory(monkeypatch):
    """On a CPU device offloading saves nothing (VAE tiling does, at 1024²): with the free memory between the
    8bit and the low plans, "auto" loads int8 weights; below every plan it is refused in one line."""
    pipe = tiny_pipeline("sd3")
    peaks = {name: plan(pipe, "unguided", device="cpu", profile=name).peak for name in ("none", "low", "8bit")}
    assert peaks["8bit"] < peaks["low"] < peaks["none"]
    free = (peaks["8bit"] + peaks["low"]) / 2 / 0.9 / 2**30
    monkeypatch.setattr(guidance.memory, "free_memory_gib", lambda device: free)
    assert load_model(pipe, memory="auto", device="cpu").memory_profile == "8bit"
    monkeypatch.setattr(guidance.memory, "free_memory_gib", lambda device: 1e-6)
    with pytest.raises(ValueError, match=r"needs about .* GiB even with the memory profile '8bit'"):
        load_model(tiny_pipeline("sd3"), memory="auto", device="cpu")
    assert list(PROFILES)[:3] == ["none", "balanced", "low"]
