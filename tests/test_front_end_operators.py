"""Front-end calls on models and operators: ``model.to(...)``, callables as operators, one mask convention, and
operator spec strings."""

import pytest
import torch
from tiny_models import PROMPT, flux_pipeline, sd3_pipeline

import guidance
from guidance import MeasurementFidelity, get_method, load_model
from operators import (FileMaskInpainting, FunctionOperator, Inpainting, Operator, as_operator, list_operators,
                       make_operator, operator_spec)

ENTRIES = list_operators()  # enumerated and built as in tests/test_operators_generic.py
IDS = [entry.name for entry in ENTRIES]


def build(entry, **kwargs):
    return make_operator(entry.name, **{**entry.example, **kwargs})


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _float_parameters(model_modules):
    return [p for module in model_modules for p in list(module.parameters()) + list(module.buffers())
            if p.is_floating_point()]


# -- 1. model.to(device, dtype) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_pipeline_models_to_dtype_casts_every_component_and_still_samples(kind):
    from guidance.backbones.flux import FluxModel
    from guidance.backbones.sd3 import SD3Model

    model = SD3Model(sd3_pipeline()) if kind == "sd3" else FluxModel(flux_pipeline(dev=True))
    cond = model.condition(PROMPT) if kind == "sd3" else model.condition(PROMPT, max_sequence_length=32)
    assert model.to(torch.float64) is model
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")
    modules = [m for m in model.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    assert modules and all(p.dtype == torch.float64 for p in _float_parameters(modules))
    size = 32 if kind == "sd3" else 64
    cond = model.condition(PROMPT) if kind == "sd3" else model.condition(PROMPT, max_sequence_length=32)
    out = guidance.sample(model, cond, num_steps=2, height=size, width=size, generator=_gen(), progress=False)
    assert out.x.dtype == torch.float32 and torch.isfinite(out.image).all()
    assert model.to("cpu", torch.bfloat16) is model and model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in _float_parameters(modules))


def test_pipeline_model_moves_a_separate_tiny_decoder():
    from tiny_models import tiny_taesd

    from guidance.backbones.sd3 import SD3Model

    model = SD3Model(sd3_pipeline(), decoder=tiny_taesd())
    model.to(device="cpu", dtype=torch.float64)
    assert model.codec.decoder is not model.pipeline.vae
    assert all(p.dtype == torch.float64 for p in _float_parameters([model.codec.decoder]))


def test_default_model_to_float64_casts_network_and_autoencoder_and_still_samples():
    model = load_model("default")
    assert model.to(torch.float64) is model
    assert model.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in _float_parameters([model.network, *model.codec.modules()]))
    out = guidance.sample(model, None, num_steps=2, height=32, width=32, generator=_gen(), progress=False)
    assert out.image.shape == (1, 3, 32, 32) and torch.isfinite(out.image).all()
    model.to("cpu")
    assert model.device == torch.device("cpu") and model.dtype == torch.float64


def test_to_refuses_a_non_floating_dtype_and_bad_arguments():
    model = load_model("default")
    with pytest.raises(ValueError, match=r"dtype torch.int64 is not a floating dtype"):
        model.to(torch.int64)
    with pytest.raises(ValueError, match="to\\(\\) takes only device and dtype"):
        model.to(copy=True)
    with pytest.raises(ValueError, match="to\\(\\) takes a device"):
        model.to(3.5)


def _gmm_flow():
    means = torch.randn(2, 1 * 2 * 2, generator=_gen(1), dtype=torch.float64)
    covariances = torch.eye(4, dtype=torch.float64).expand(2, 4, 4) * 0.1
    return guidance.AnalyticGMMFlow(torch.tensor([0.3, 0.7]), means, covariances, (1, 2, 2))


def test_analytic_gmm_flow_keeps_float64_and_only_moves():
    flow = _gmm_flow()
    assert flow.to("cpu") is flow and flow.to(torch.float64) is flow and flow.to(device="cpu", dtype=torch.float64)
    assert flow.dtype == torch.float64 and flow.prior.means.dtype == torch.float64
    with pytest.raises(ValueError, match="AnalyticGMMFlow computes in float64 only, got dtype=torch.float32"):
        flow.to(torch.float32)
    with pytest.raises(ValueError, match="is not a floating dtype"):
        flow.to(torch.int32)
    out = guidance.sample(flow, None, num_steps=2, generator=_gen(), progress=False)
    assert out.image.shape == (1, 1, 2, 2) and torch.isfinite(out.image).all()


def test_simplex_flows_move_their_network_and_prior():
    network = guidance.EndpointNetwork(6, 4, width=16, layers=1)
    flow = guidance.NetworkSimplexFlow(network)
    assert flow.to(torch.float64) is flow and flow.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in flow.network.parameters())
    out = guidance.sample_sequences(flow, num_steps=2, batch_size=2, generator=_gen(), progress=False)
    assert out.tokens.shape == (2, 6) and out.x.dtype == torch.float32
    flow.to("cpu", torch.bfloat16)
    assert flow.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in flow.network.parameters())
    assert guidance.sample_sequences(flow, num_steps=2, batch_size=2, generator=_gen(), progress=False).x.isfinite().all()

    analytic = guidance.AnalyticSimplexFlow(guidance.CategoricalMixture.random(2, 6, 4, generator=_gen()))
    assert analytic.to("cpu") is analytic and analytic.dtype == torch.float64
    with pytest.raises(ValueError, match="AnalyticSimplexFlow computes in float64 only"):
        analytic.to(torch.float32)
    assert guidance.sample_sequences(analytic, num_steps=2, batch_size=2, generator=_gen(), progress=False).tokens.shape == (2, 6)


# -- 2. callables and nn.Modules as operators ------------------------------------------------------------------------
def test_flowchef_restores_through_a_lambda_operator_on_the_default_model():
    model = load_model("default")
    x = torch.rand(1, 3, 32, 32, generator=_gen(3)) * 2 - 1
    y = x[..., ::2, ::2]
    objective = MeasurementFidelity(lambda x: x[..., ::2, ::2], y)
    assert isinstance(objective.operator, FunctionOperator)
    out = get_method("flowchef")(model, objective, num_steps=2, height=32, width=32, generator=_gen(),
                                 progress=False)
    assert out.image.shape == (1, 3, 32, 32) and torch.isfinite(out.image).all()


def test_a_module_operator_is_a_submodule_that_follows_double():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
    op = make_operator(conv, linear=True)
    assert isinstance(op, FunctionOperator) and op.is_linear
    assert any(p is conv.weight for p in op.parameters())
    op.double()
    assert conv.weight.dtype == torch.float64
    assert op(torch.rand(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
    assert isinstance(MeasurementFidelity(conv, torch.zeros(1, 3, 8, 8)).operator, FunctionOperator)


def test_a_linear_callable_operator_passes_the_adjointness_check():
    op = make_operator(lambda x: x[..., ::2, ::2], linear=True)
    x = torch.rand(2, 3, 8, 8, generator=_gen(1), dtype=torch.float64)
    y = torch.rand(2, 3, 4, 4, generator=_gen(2), dtype=torch.float64)
    assert torch.allclose((op(x) * y).sum(), (x * op.adjoint(y)).sum())  # <A x, y> = <x, A^T y>
    assert op.adjoint(y[:1]).shape == (1, 3, 8, 8)
    fresh = make_operator(lambda x: x[..., ::2, ::2], linear=True)
    with pytest.raises(ValueError, match="apply the operator to an image first or pass input_shape="):
        fresh.adjoint(y)
    shaped = make_operator(lambda x: x[..., ::2, ::2], linear=True, input_shape=lambda s: (*s[:2], 2 * s[2], 2 * s[3]))
    assert torch.allclose((shaped(x) * y).sum(), (x * shaped.adjoint(y)).sum())
    double = make_operator(lambda x: 2 * x, linear=True, adjoint=lambda y: 2 * y)
    assert torch.equal(double.adjoint(y), 2 * y)


def test_as_operator_keeps_operators_and_names_what_it_accepts():
    op = make_operator("sr:factor=2")
    assert as_operator(op) is op and make_operator(op) is op
    assert isinstance(as_operator("sr:factor=2"), Operator)
    with pytest.raises(ValueError, match=r"an operator must be an operators.Operator, a spec string .*got int"):
        as_operator(3)
    with pytest.raises(ValueError, match=r"an operator must be an operators.Operator.*got int"):
        MeasurementFidelity(3, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="a function operator has no parameter\\(s\\) \\['factor'\\]"):
        make_operator(torch.tanh, factor=2)
    with pytest.raises(ValueError, match="pass an instance"):
        make_operator(Inpainting)


# -- 3. one mask convention: 1 / white = missing ---------------------------------------------------------------------
def test_the_same_mask_means_the_same_pixels_everywhere(tmp_path):
    from tasks.commands.edit import read_mask
    from tasks.outputs.image_io import save_image

    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:10, 2:7] = 1  # white = missing / to edit
    path = save_image(mask.expand(1, 3, 16, 16) * 2 - 1, tmp_path / "mask.png")
    x = torch.rand(1, 3, 16, 16) + 0.5  # no zeros, so a zero output marks a dropped pixel
    tensor_op, file_op = Inpainting(mask=mask), make_operator(f"inpaint_mask:path={path}")
    assert isinstance(file_op, FileMaskInpainting)
    for op in (tensor_op, file_op):
        assert torch.equal(op.missing_for(x), mask)
        assert torch.equal(op(x) == 0, mask.bool().expand_as(x))
    assert torch.equal(read_mask(path), mask) and torch.equal(read_mask(mask[0, 0]), mask)
    assert torch.equal(FileMaskInpainting(path, invert=True).missing_for(x), 1 - mask)


# -- 4. operator spec strings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise_std", [0.0, 0.05])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_every_registry_operator_is_rebuilt_from_its_spec(entry, noise_std):
    op = build(entry, noise_std=noise_std)
    spec = operator_spec(op)
    assert isinstance(spec, str)
    rebuilt = make_operator(spec)
    assert type(rebuilt) is type(op) and rebuilt.noise_std == op.noise_std
    assert operator_spec(rebuilt) == spec
    x = torch.rand(1, 3, 64, 64, generator=_gen(4)) * 2 - 1
    torch.testing.assert_close(rebuilt(x), op(x))


@pytest.mark.parametrize("spec", ["gaussian_blur:sigma=2.0 | sr:factor=2", "inpaint_box:size=(4, 8),top=1",
                                  "line_motion_blur:angle=30.0,padding=constant,poisson_rate=100.0"])
def test_specs_round_trip(spec):
    assert operator_spec(make_operator(spec)) == spec


def test_a_composition_with_its_own_noise_is_rebuilt():
    op = make_operator("gaussian_blur:sigma=2.0 | sr:factor=2", noise_std=0.1)
    rebuilt = make_operator(operator_spec(op))
    assert rebuilt.noise_std == 0.1 and [type(p) for p in rebuilt.parts] == [type(p) for p in op.parts]
    assert rebuilt.parts[0].sigma == 2.0


def test_operators_no_spec_describes_give_none():
    assert operator_spec(make_operator(lambda x: 2 * x)) is None
    assert operator_spec(make_operator(torch.nn.Identity())) is None
    assert operator_spec(Inpainting(torch.zeros(8, 8))) is None
    assert operator_spec(make_operator("compose", operators=["sr:factor=2", lambda x: x])) is None
    assert operator_spec(make_operator(torch.tanh)) == "function:fn=torch:tanh"
