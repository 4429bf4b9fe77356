"""The GPU paths: every test here takes the ``cuda_device`` fixture, is marked ``cuda`` by that alone, is skipped
without a GPU and is what the GPU kit (``scripts/gpu_check.sh``) runs with ``-m cuda``. Its dry run runs the same
tests on the CPU (``FLOWSTEER_CUDA_TESTS_DEVICE=cpu``), so they are known to work before a GPU is lent.

What they catch: a CPU generator against device tensors, a tensor left on the CPU, a dtype mismatch in bf16,
solver state that is not float32, the allocator-based peak memory, compiled blocks that differ from eager ones,
and offloaded pipelines."""

import json
import os

import pytest
import torch
from tiny_models import NEGATIVE, PROMPT, flux_pipeline, sd3_pipeline, tiny_taesd

from guidance import AnalyticGMMFlow, MeasurementFidelity, get_method, sample
from guidance.features.calibration import DEFAULT_CRW
from guidance.backbones.flux import FluxModel
from guidance.backbones.sd3 import SD3Model
from operators import make_operator

#: torch.compile backend of the compile test: the GPU kit uses inductor, its CPU dry run eager (seconds, not minutes).
COMPILE_BACKEND = os.environ.get("FLOWSTEER_TEST_COMPILE_BACKEND", "inductor")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> None:
    """a and b agree to ``tolerance`` relative to b's largest magnitude (TF32 convolutions on a GPU round at about
    1e-3; a wrong noise draw or a missed update is off by order one)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    error = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert error < tolerance, f"relative error {error:.3g} >= {tolerance}"


def _text_model(kind: str, device, dtype=torch.float32):
    if kind == "sd3":
        model = SD3Model(sd3_pipeline().to(device=device, dtype=dtype),
                         decoder=tiny_taesd().to(device=device, dtype=dtype))
        return model, model.condition(PROMPT, NEGATIVE, 5.0), 32
    model = FluxModel(flux_pipeline(dev=True).to(device=device, dtype=dtype))
    return model, model.condition(PROMPT, max_sequence_length=32), 64


def _objective(size: int, device, space: str = "pixel"):
    op = make_operator("sr:factor=4", noise_std=0.01)
    clean = torch.rand(1, 3, size, size, generator=_gen(7)) * 1.6 - 0.8
    y = op.measure(clean, _gen(8))
    return MeasurementFidelity(op.to(device), y.to(device), space=space)


# -- sampling -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_sampling_on_the_device_matches_the_cpu_for_the_same_cpu_generator(cuda_device, kind):
    """The noise is drawn on the generator's device (the CPU here), so one seed gives one image anywhere."""
    cpu_model, cpu_cond, size = _text_model(kind, "cpu")
    model, cond, _ = _text_model(kind, cuda_device)
    reference = sample(cpu_model, cpu_cond, num_steps=3, height=size, width=size, generator=_gen(1), progress=False)
    out = sample(model, cond, num_steps=3, height=size, width=size, generator=_gen(1), progress=False)
    assert out.x.device.type == cuda_device.type and out.x.dtype == torch.float32
    _close(out.x, reference.x, 2e-2)
    _close(out.image, reference.image, 2e-2)


def test_generators_on_the_device_are_reproducible_and_batch(cuda_device):
    model, cond, size = _text_model("sd3", cuda_device)

    def run(generator, batch_size=None):
        return sample(model, cond, num_steps=2, height=size, width=size, generator=generator, batch_size=batch_size,
                      progress=False).x

    first = run(torch.Generator(cuda_device).manual_seed(3))
    assert torch.equal(first, run(torch.Generator(cuda_device).manual_seed(3)))
    both = run([torch.Generator(cuda_device).manual_seed(3), torch.Generator(cuda_device).manual_seed(4)], 2)
    _close(both[:1], first, 1e-4)
    assert not torch.allclose(both[0], both[1])


# -- every method, bf16 backbone, float32 state ---------------------------------------------------------------
METHOD_CASES = {
    "unguided": ("unguided", None, {}),
    "flowchef-latent": ("flowchef", "latent", {}),
    "flowchef-pixel": ("flowchef", "pixel", {}),
    "flair": ("flair", "pixel", {"crw": DEFAULT_CRW, "data_steps": 3}),
    "pnp_flow": ("pnp_flow", "pixel", {}),
    "dps": ("dps", "pixel", {}),
    "best_of_n": ("best_of_n", "pixel", {"candidates": 2}),
}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_every_method_runs_on_a_bf16_backbone_with_float32_state(cuda_device, kind, case):
    method, space, options = METHOD_CASES[case]
    model, cond, size = _text_model(kind, cuda_device, torch.bfloat16)
    objective = None if space is None else _objective(size, cuda_device, space)
    out = get_method(method, **options)(model, objective, num_steps=3, cond=cond, height=size, width=size,
                                        generator=_gen(2), progress=False)
    assert out.x.dtype == torch.float32 and out.x.device.type == cuda_device.type
    assert out.image.dtype == torch.float32 and out.image.device.type == cuda_device.type
    assert out.image.shape == (1, 3, size, size) and bool(torch.isfinite(out.image).all())


def test_guided_methods_on_the_device_match_the_cpu_in_float32(cuda_device):
    """FlowChef (pixel loss through the decoder) and FLAIR, float32: the device follows the CPU step for step."""
    cpu_model, cpu_cond, size = _text_model("sd3", "cpu")
    model, cond, _ = _text_model("sd3", cuda_device)
    for method, options in (("flowchef", {}), ("flair", {"crw": DEFAULT_CRW, "data_steps": 2})):
        common = dict(num_steps=3, height=size, width=size, progress=False, **{})
        reference = get_method(method, **options)(cpu_model, _objective(size, "cpu"), cond=cpu_cond,
                                                  generator=_gen(5), **common)
        out = get_method(method, **options)(model, _objective(size, cuda_device), cond=cond, generator=_gen(5),
                                            **common)
        _close(out.x, reference.x, 2e-2)


def test_analytic_flow_on_the_device_equals_the_cpu_in_float64(cuda_device):
    """The exact Gaussian-mixture flow does its float64 arithmetic on the device: FlowChef and FLAIR give the CPU's
    numbers to float64 rounding (no TF32 in float64)."""
    g = _gen(11)
    d = 16
    factors = torch.randn(2, d, d, generator=g, dtype=torch.float64) / d ** 0.5
    covariances = factors @ factors.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)
    means = 0.5 * torch.randn(2, d, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.4, 0.6], dtype=torch.float64)
    cpu_flow = AnalyticGMMFlow(weights, means, covariances, (1, 4, 4))
    flow = AnalyticGMMFlow(weights, means, covariances, (1, 4, 4), device=cuda_device)
    op = make_operator("inpaint_box:fraction=0.25", noise_std=0.05)
    y = op.measure(cpu_flow.prior.sample(2, generator=_gen(12)).reshape(2, 1, 4, 4).float(), _gen(13))
    for method, options in (("flowchef", {"step_size": 0.5}), ("flair", {"crw": 0.3})):
        runs = [get_method(method, **options)(f, MeasurementFidelity(op, y), num_steps=8, generator=_gen(14),
                                              progress=False) for f in (cpu_flow, flow)]
        torch.testing.assert_close(runs[1].x.cpu(), runs[0].x, rtol=1e-6, atol=1e-6)


# -- the default model and the command line -------------------------------------------------------------------
def test_default_model_restores_on_the_device_as_on_the_cpu(cuda_device):
    from guidance import load_model
    from tasks.commands.restore import restore

    image = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=_gen(21)) * 1.6 - 0.8, size=(32, 32),
                                            mode="bicubic").clamp(-1, 1)
    common = dict(simulate=True, num_steps=3, seed=1, progress=False)
    reference = restore(load_model("default", device="cpu"), image, "sr:factor=2", "flowchef", **common)
    out = restore(load_model("default", device=cuda_device), image, "sr:factor=2", "flowchef", **common)
    assert out.restored.shape == reference.restored.shape
    _close(out.restored, reference.restored, 2e-2)
    assert out.metrics["peak_memory_kind"] == ("cuda" if cuda_device.type == "cuda"
                                               else "process RSS high-water mark")


def test_restore_command_on_the_device(cuda_device, cli, photo_32, tmp_path):
    out = tmp_path / "restored"
    code, _, stderr = cli("restore", photo_32, "--simulate", "--operator", "sr:factor=2", "--method", "pnp_flow",
                          "--steps", "2", "--device", str(cuda_device), "--out", out, "--quiet")
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["psnr"] > 10 and (out / "restored.png").is_file()


# -- speed paths ----------------------------------------------------------------------------------------------
def test_speed_cell_on_the_device_reports_the_allocator_peak(cuda_device):
    from tasks.commands.speed import Cell, Settings, measure_cell, open_backbone

    settings = Settings(str(cuda_device), "bfloat16" if cuda_device.type == "cuda" else "float32", repeats=1,
                        isolate=False)
    model, cond, info = open_backbone("tiny-sd3", settings)
    assert info["device"] == str(cuda_device) and info["decoder"] == "AutoencoderTiny (tiny)"
    row = measure_cell(model, cond, Cell("tiny-sd3", "flair", 32, 2), settings)
    assert row["status"] == "measured" and row["nfe"] == 2 and row["peak_memory_gib"] > 0
    expected = "torch.cuda.max_memory_allocated" if cuda_device.type == "cuda" else "process RSS high-water mark"
    assert row["memory_kind"] == expected


def test_regional_compile_on_the_device_gives_the_eager_velocity(cuda_device):
    model, cond, _ = _text_model("sd3", cuda_device)
    x = torch.randn(1, 4, 4, 4, generator=_gen(31)).to(cuda_device)
    eager = model.velocity(x, 0.5, cond)
    model.compile(regional=True, backend=COMPILE_BACKEND)
    compiled = model.velocity(x, 0.5, cond)
    again = model.velocity(x, 0.4, cond)  # a new sigma: no recompile needed, still the eager numbers
    _close(compiled, eager, 1e-3)
    assert bool(torch.isfinite(again).all())


def test_model_cpu_offload_pipeline_gives_the_resident_result(cuda_device):
    """A user's pipeline with enable_model_cpu_offload (accelerate hooks move each component to the GPU when it is
    called) is used as it is: FlowChef through the decoder gives what the resident pipeline gives."""
    if cuda_device.type != "cuda":
        pytest.skip("model CPU offload needs an accelerator")
    resident = SD3Model(sd3_pipeline().to(cuda_device))
    pipe = sd3_pipeline()
    pipe.enable_model_cpu_offload(device=cuda_device)
    offloaded = SD3Model(pipe)
    assert offloaded.device.type == "cuda"
    runs = []
    for model in (resident, offloaded):
        cond = model.condition(PROMPT, NEGATIVE, 5.0)
        runs.append(get_method("flowchef")(model, _objective(32, cuda_device), num_steps=3, cond=cond, height=32,
                                           width=32, generator=_gen(41), progress=False))
    _close(runs[1].x, runs[0].x, 1e-4)
    _close(runs[1].image, runs[0].image, 1e-4)
