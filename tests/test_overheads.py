"""Host-side costs per step that are small on a CPU miniature and large on a GPU: none may come back.

* placement: diffusers reads a pipeline's device and dtype by walking every submodule of every component; a
  step reads them from a cache that follows moves and offloading (``PipelineFlowModel.device``,
  ``autoencoder.execution_placement``);
* CFG: the [cond; negative] text embeddings are concatenated once per condition and batch, not at every step;
* objectives and operators: a second ``bind`` with the same arguments costs nothing, and ‖A‖² is computed once
  per operator content, whichever instance asks.
"""

from collections import OrderedDict

import pytest
import torch
from test_host_sync import HostReads
from torch.overrides import TorchFunctionMode
from tiny_models import NEGATIVE, PROMPT, sd3_pipeline

import operators.base
from guidance import MeasurementFidelity, sample
from guidance.backbones.autoencoder import execution_device
from guidance.backbones.sd3 import SD3Model
from operators import BoxInpainting, make_operator
from operators.base import LinearOperator, operator_gain


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def walks(monkeypatch):
    """Counts calls of ``nn.Module.named_modules``, which ``modules()``, ``parameters()`` and every walk over a
    module tree go through (a list, so that a test reads the running count)."""
    count = [0]
    original = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
    return count


# -- placement -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_sampling_step_walks_no_module_tree(request, walks, family):
    """Checked to fail: with ``device`` reading ``pipeline._execution_device`` at every call (the code before the
    cache) a step of the tiny SD3 made 657 walks, of the tiny FLUX.1 1406; with the autoencoder's placement read
    at every call, a decode and an encode made 1098."""
    model = request.getfixturevalue(family)
    cond = model.condition(PROMPT, NEGATIVE, 5.0) if family == "sd3" else \
        model.condition(PROMPT, NEGATIVE, true_cfg_scale=2.0, max_sequence_length=32)
    marks = []
    sample(model, cond, num_steps=3, height=32, width=32, generator=_gen(), progress=False, decode=False,
           callback=lambda info: marks.append(walks[0]))
    assert len(marks) == 3 and marks[-1] == marks[0], f"{marks[-1] - marks[0]} module walks in two steps"
    latent = torch.randn(1, *model.latent_shape(32, 32), generator=_gen(1))
    image = model.decode(latent)
    before = walks[0]
    model.encode(model.decode(latent))  # FLAIR decodes and encodes at every data step
    assert walks[0] == before, f"{walks[0] - before} module walks in a decode and an encode"
    assert image.shape == (1, 3, 32, 32)


def test_the_device_follows_moves_and_offloading_inside_and_outside_the_wrapper(monkeypatch):
    """The cached placement is read again after every move: the wrapper's ``to`` and offloading, and the same done
    to the pipeline behind the wrapper's back. Offloading to the CPU reports the hook's device ``cpu:0``, which
    differs from the resident ``cpu``. Checked to fail: without the offload hook in the stamp, the pipeline's own
    ``enable_model_cpu_offload`` leaves ``device`` at ``cpu``."""
    model = SD3Model(sd3_pipeline())
    reads = [0]
    original = type(model.pipeline)._execution_device

    def counted(pipeline):
        reads[0] += 1
        return original.fget(pipeline)

    monkeypatch.setattr(type(model.pipeline), "_execution_device", property(counted))
    assert (model.device, model.dtype, model.device) == (torch.device("cpu"), torch.float32, torch.device("cpu"))
    assert reads == [1]
    model.pipeline.to(torch.float64)  # behind the wrapper's back
    assert model.dtype == torch.float64 and reads == [2]
    model.to(torch.float32)
    assert model.dtype == torch.float32 and reads == [3]
    model.pipeline.enable_model_cpu_offload(device="cpu")  # behind the wrapper's back
    assert model.device == torch.device("cpu", 0) and reads == [4]
    assert execution_device(model.codec.decoder) == torch.device("cpu", 0)
    model.pipeline.remove_all_hooks()
    assert model.device == torch.device("cpu") and execution_device(model.codec.decoder) == torch.device("cpu")
    model.enable_model_cpu_offload(device="cpu")
    out = sample(model, model.condition(PROMPT, NEGATIVE, 5.0), num_steps=2, height=32, width=32, generator=_gen(),
                 progress=False)
    assert model.device == torch.device("cpu", 0) and torch.isfinite(out.image).all()

    parked = SD3Model(sd3_pipeline())
    assert parked.device == torch.device("cpu")
    parked.enable_sequential_cpu_offload(device="cpu")  # weights parked on the meta device, run on the CPU
    assert next(parked.transformer.parameters()).device.type == "meta"
    assert parked.device == torch.device("cpu", 0)


# -- CFG embeddings --------------------------------------------------------------------------------------------

class CatsOf(TorchFunctionMode):
    """Counts ``torch.cat`` calls that take one of ``tensors`` (a condition's own embeddings) as an input."""

    def __init__(self, tensors):
        super().__init__()
        self.ids, self.count = {id(t) for t in tensors}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat:
            inputs = args[0] if args else kwargs.get("tensors", ())
            self.count += any(id(t) in self.ids for t in inputs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cfg_concatenates_the_text_embeddings_once_per_condition(request, family):
    """A step concatenates only the latents: the [cond; negative] embeddings are made at the first step and reused
    (the same tensors at every step), and equal the concatenation of the condition's own. Checked to fail: with the
    concatenation back in ``velocity`` every step counts 2 (embeddings and pooled)."""
    model = request.getfixturevalue(family)
    if family == "sd3":
        cond = model.condition([PROMPT, "a red fox"], NEGATIVE, 5.0)
        pair = [cond.negative_prompt_embeds, cond.prompt_embeds]
    else:
        cond = model.condition([PROMPT, "a red fox"], NEGATIVE, true_cfg_scale=2.0, max_sequence_length=32)
        pair = [cond.prompt_embeds, cond.negative_prompt_embeds]
    tensors = [cond.prompt_embeds, cond.negative_prompt_embeds, cond.pooled_prompt_embeds,
               cond.negative_pooled_prompt_embeds]
    model.clear_conditions()  # the first step below makes them
    seen = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    mode = CatsOf(tensors)
    marks = []
    try:
        with mode:
            sample(model, cond, num_steps=3, height=32, width=32, generator=_gen(), progress=False, decode=False,
                   callback=lambda info: marks.append(mode.count))
    finally:
        handle.remove()
    assert marks[-1] == marks[0], f"{marks[-1] - marks[0]} concatenations of the text embeddings in two steps"
    assert len(seen) == 3 and all(s is seen[0] for s in seen)
    assert torch.equal(seen[0], torch.cat(pair))


def test_cached_text_inputs_follow_the_condition_batch_and_gradients(sd3):
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    x = torch.randn(2, 4, 4, 4, generator=_gen(2))
    made = []

    def make():
        made.append(1)
        return (torch.zeros(1),)

    first = sd3.text_batch(cond, 2, make)
    assert sd3.text_batch(cond, 2, make) is first and len(made) == 1
    sd3.text_batch(cond, 4, make)  # another batch
    sd3.text_batch(sd3.condition("a red fox", NEGATIVE, 5.0), 2, make)  # another condition
    assert len(made) == 3
    # embeddings being optimised: every call builds its own inputs, so each step's graph backpropagates
    embeds = cond.prompt_embeds.clone().requires_grad_(True)
    trained = sd3.condition(prompt_embeds=embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                            negative_prompt_embeds=cond.negative_prompt_embeds,
                            negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds, guidance_scale=5.0)
    with torch.no_grad():
        sd3.velocity(x, 0.5, trained)
    for sigma in (0.7, 0.4):  # autograd.grad: no gradient lands on the shared fixture's parameters
        (grad,) = torch.autograd.grad(sd3.velocity(x, sigma, trained, grad=True).square().sum(), embeds)
        assert grad.abs().sum() > 0


# -- objectives and operators ----------------------------------------------------------------------------------

def _counting(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` (an instance's method) by a counting wrapper; returns the running count."""
    count, original = [0], getattr(owner, name)

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return count


def test_a_second_bind_with_the_same_arguments_costs_nothing(sd3, monkeypatch):
    """Checked to fail: with every bind running in full, the second bind solves A⁺y and encodes again."""
    operator = make_operator("sr:factor=4")
    y = operator(torch.rand(1, 3, 32, 32, generator=_gen(4)) * 2 - 1)
    latent = MeasurementFidelity(operator, y, space="latent")
    solves, encodes = _counting(monkeypatch, operator, "pseudo_inverse"), _counting(monkeypatch, sd3, "encode")
    latent.bind(sd3, 32, 32)
    target = latent._target
    latent.bind(sd3, 32, 32)
    assert (solves, encodes) == ([1], [1]) and latent._target is target
    y.mul_(1.0)  # an in-place edit of the measurement binds anew
    latent.bind(sd3, 32, 32)
    assert (solves, encodes) == ([2], [2])
    other = SD3Model(sd3.pipeline)  # another model (here: the same weights) binds anew
    other_encodes = _counting(monkeypatch, other, "encode")
    latent.bind(other, 32, 32)
    latent.bind(other, 32, 32)
    assert (solves, encodes, other_encodes) == ([3], [2], [1])
    pixel = MeasurementFidelity(operator, y)
    pixel.bind(sd3, 32, 32)
    mode = HostReads()
    with mode:
        pixel.bind(sd3, 32, 32)  # the range check of y read the device the first time only
    assert mode.count == 0


def test_equal_operators_built_separately_share_one_gain(monkeypatch):
    """‖A‖² is cached by the operator's content: equal operators built separately compute it once, different ones
    (or an edited one) again. Checked to fail: with the cache keyed by instance (``operator_state``), the second
    equal operator computes it again."""
    monkeypatch.setattr(operators.base, "_gain_cache", OrderedDict())
    runs = _counting(monkeypatch, operators.base, "_top_eigenvalue")
    shape = (1, 3, 16, 16)
    blur = operator_gain(make_operator("gaussian_blur:kernel_size=5,sigma=1.0"), shape)
    assert operator_gain(make_operator("gaussian_blur:kernel_size=5,sigma=1.0"), shape) == blur and runs == [1]
    assert operator_gain(make_operator("gaussian_blur:kernel_size=5,sigma=1.5"), shape) != blur and runs == [2]
    box = operator_gain(BoxInpainting(fraction=0.25), shape)  # its mask buffer is built by the first run
    assert operator_gain(BoxInpainting(fraction=0.25), shape) == box and runs == [3]
    edited = make_operator("gaussian_blur:kernel_size=5,sigma=1.0")
    with torch.no_grad():
        edited.kernel_x.mul_(2)
    assert operator_gain(edited, shape) == pytest.approx(4 * blur, rel=1e-4) and runs == [4]


@pytest.mark.parametrize("spec", ["sr:factor=4", "sr:factor=3,padding='symmetric'"])
def test_sr_adjoint_and_pseudo_inverse_are_closed_forms(spec):
    """Bicubic SR's Aᵀ and A⁺ read nothing back from the device (conjugate gradients read the residual once per
    iteration: 13 reads for this A⁺ before) and equal autograd's vector-Jacobian product and the conjugate-gradient
    solution."""
    op = make_operator(spec)
    y = torch.rand(2, 3, 8, 9, generator=_gen(5)) * 2 - 1
    mode = HostReads()
    with mode:
        adjoint, inverse = op.adjoint(y), op.pseudo_inverse(y)
    assert mode.count == 0
    torch.testing.assert_close(adjoint, LinearOperator.A_adjoint(op, y), rtol=0, atol=1e-6)
    torch.testing.assert_close(inverse, op.A_dagger_cg(y, max_iters=300), rtol=0, atol=2e-5)
    torch.testing.assert_close(op(inverse), y, rtol=0, atol=1e-5)
