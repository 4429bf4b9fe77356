"""Straight-through hard inputs: exact hard values, surrogate gradients, and FlowChef steering through rounding."""

import io

import pytest
import torch
from PIL import Image
from tiny_models import NEGATIVE, PROMPT

from guidance import CallableObjective, objective_gradient, sample
from guidance.features.hard_inputs import (
    DecisionObjective,
    HardInputObjective,
    argmax_decision,
    get_hard_function,
    hard_function,
    quantize,
    straight_through,
    threshold,
)
from guidance.methods.flowchef import flowchef
from tasks.outputs.image_io import load_image, to_pil


class _Identity:
    """A stand-in model whose decoder is the identity, for pixel-space objectives on plain tensors."""

    @staticmethod
    def decode(z):
        return z


IDENTITY = _Identity()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grad(fn, x, w):
    """∂ Σ fn(x) · w / ∂x."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((fn(x) * w).sum(), x)
    return g


def _jpeg(x: torch.Tensor) -> torch.Tensor:
    """A JPEG round trip through PIL, one image at a time: not differentiable at all."""
    out = []
    for image in x:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="JPEG", quality=30)
        out.append(load_image(Image.open(buffer)))
    return torch.cat(out)


# -- hard values and their gradients ------------------------------------------------------------------------------

def test_quantize_matches_an_8_bit_png_and_passes_the_gradient_straight_through():
    x = torch.rand(1, 3, 16, 16, generator=_gen(1)) * 2.4 - 1.2  # some pixels out of range
    buffer = io.BytesIO()
    to_pil(x).save(buffer, format="PNG")
    assert torch.equal(quantize(x), load_image(Image.open(buffer)))
    assert quantize(x, bits=1).unique().tolist() == [-1.0, 1.0]
    inside = x.clamp(-0.99, 0.99)
    w = torch.randn(inside.shape, generator=_gen(2))
    assert torch.equal(_grad(quantize, inside, w), w)
    # plain rounding has the same values but no gradient at all: the reason for straight-through
    naive = lambda v: ((v + 1) * 127.5).round() / 255 * 2 - 1
    assert torch.equal(naive(inside), quantize(inside))
    assert not _grad(naive, inside, w).any()


def test_threshold_and_argmax_decision_are_hard_with_the_surrogate_gradients():
    x = torch.randn(4, 6, generator=_gen(3))
    w = torch.randn(4, 6, generator=_gen(4))
    assert torch.equal(threshold(x, 0.2), (x > 0.2).float())
    assert torch.equal(_grad(lambda v: threshold(v, 0.2), x, w), w)
    sig = lambda v: torch.sigmoid((v - 0.2) / 0.5)
    torch.testing.assert_close(_grad(lambda v: threshold(v, 0.2, temperature=0.5), x, w), _grad(sig, x, w))

    decision = argmax_decision(x, temperature=2.0)
    assert torch.equal(decision, torch.nn.functional.one_hot(x.argmax(1), 6).float())
    soft = lambda v: torch.softmax(v / 2.0, dim=1)
    torch.testing.assert_close(_grad(lambda v: argmax_decision(v, 2.0), x, w), _grad(soft, x, w))

    with pytest.raises(ValueError, match="same shape"):
        straight_through(x, x[:2])


def test_hard_function_runs_any_black_box_with_an_identity_gradient():
    x = torch.rand(2, 3, 16, 16, generator=_gen(5)) * 2 - 1
    jpeg = hard_function(_jpeg)
    assert torch.equal(jpeg(x), _jpeg(x)) and not torch.equal(jpeg(x), x)
    w = torch.randn(x.shape, generator=_gen(6))
    assert torch.equal(_grad(jpeg, x, w), w)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 16, 16\).*\(2, 3, 8, 8\)"):
        hard_function(lambda v: v[..., :8, :8])(x)
    with pytest.raises(ValueError, match="NaN"):
        hard_function(lambda v: v * float("nan"))(x)


def test_hard_functions_by_name_and_bad_input():
    x = torch.rand(1, 3, 8, 8, generator=_gen(7)) * 2 - 1
    assert torch.equal(get_hard_function("quantize:bits=4")(x), quantize(x, bits=4))
    assert torch.equal(get_hard_function("threshold:level=0.3,temperature=none")(x), threshold(x, 0.3))
    assert get_hard_function(quantize) is quantize and get_hard_function("threshold") is threshold
    for bits in (0, 17, 4.5):
        with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
            quantize(x, bits=bits)
    with pytest.raises(ValueError, match="bits must be an integer"):
        get_hard_function("quantize:bits=40")
    with pytest.raises(ValueError, match="did you mean 'quantize'.*Available: quantize, threshold"):
        get_hard_function("quantise")
    with pytest.raises(ValueError, match="takes key=value options among bits"):
        get_hard_function("quantize:levels=3")
    with pytest.raises(ValueError, match="loss must be a callable"):
        HardInputObjective("mse")
    objective = HardInputObjective(lambda h: torch.as_tensor(h.detach().numpy().mean((1, 2, 3))))
    with pytest.raises(ValueError, match="differentiable in the hard input.*hard="):
        objective_gradient(objective, IDENTITY, x)


def test_decision_objective_has_the_softmax_gradient_and_checks_the_label():
    classifier = torch.nn.Linear(12, 3)
    torch.nn.init.normal_(classifier.weight, generator=_gen(8))
    flat = lambda v: v.flatten(1)
    x = torch.randn(2, 3, 2, 2, generator=_gen(9))
    objective = DecisionObjective(classifier, 1, preprocess=flat, temperature=0.5)
    logits = classifier(flat(x))
    expected = -(logits.argmax(1) == 1).float()
    loss, grad = objective_gradient(objective, IDENTITY, x)
    assert torch.equal(loss, expected)
    surrogate = CallableObjective(lambda v: -torch.softmax(classifier(flat(v)) / 0.5, dim=1)[:, 1])
    _, reference = objective_gradient(surrogate, IDENTITY, x)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, reference)
    with pytest.raises(ValueError, match="out of range.*3 classes"):
        objective_gradient(DecisionObjective(classifier, 3, preprocess=flat), IDENTITY, x)
    with pytest.raises(ValueError, match="out of range"):
        DecisionObjective(classifier, -1, num_classes=3)


# -- FlowChef through rounding on the tiny SD3 model ---------------------------------------------------------------

def test_straight_through_flowchef_lowers_a_quantised_objective_where_plain_autograd_cannot(sd3):
    cond = sd3.condition(PROMPT, NEGATIVE, 5.0)
    common = {"cond": cond, "num_steps": 8, "height": 32, "width": 32, "progress": False}
    target = quantize(sample(sd3, generator=_gen(1), **common).image)  # an 8-bit image of another seed
    mse = lambda h: ((h - target) ** 2).flatten(1).mean(1)
    objective = HardInputObjective(mse, hard="quantize")

    unguided = sample(sd3, generator=_gen(0), **common)
    guided = flowchef(sd3, objective, generator=_gen(0), step_size=50.0, **common)
    before, after = objective.raw_loss(unguided.image).item(), objective.raw_loss(guided.image).item()
    assert after < 0.5 * before, (before, after)
    assert torch.equal(objective.raw_loss(guided.image), objective.loss(guided.image))
    per_step = guided.info["loss"][:, 0, 0]
    assert per_step.shape == (8,) and per_step[-1] < 0.5 * per_step[0], per_step

    # the same objective with torch.round and no straight-through: autograd gives an all-zero gradient ...
    rounded = CallableObjective(lambda x: mse(((x.clamp(-1, 1) + 1) * 127.5).round() / 255 * 2 - 1))
    loss, grad = objective_gradient(rounded, sd3, guided.x)
    assert torch.isfinite(loss).all() and grad.numel() > 0 and not grad.any()
    # ... so FlowChef with it is unguided sampling, bit for bit
    stuck = flowchef(sd3, rounded, generator=_gen(0), step_size=50.0, **common)
    assert torch.equal(stuck.x, unguided.x) and torch.equal(stuck.image, unguided.image)
