"""Objectives (measurement, classifier with a transformers processor, reward) and the floor methods."""

import pytest
import torch
from tiny_models import flux_components, sd3_pipeline
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from guidance import ClassifierObjective, MeasurementFidelity, RewardObjective, get_method, objective_gradient
from guidance.backbones.flux import FluxModel
from guidance.backbones.sd3 import SD3Model
from guidance.objectives import transformers_preprocess
from operators import make_operator


def tiny_models():
    yield SD3Model(sd3_pipeline())
    yield FluxModel.from_components(**flux_components(dev=True))


def test_measurement_shape_mismatch_is_named_at_bind():
    model = SD3Model(sd3_pipeline())
    objective = MeasurementFidelity(make_operator("sr:factor=2"), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"measurement has shape \(1, 3, 8, 8\) but the operator maps a 32x32"):
        objective.bind(model, 32, 32)


def test_pixel_and_latent_fidelity_gradients():
    model = SD3Model(sd3_pipeline())
    op = make_operator("inpaint_box:fraction=0.25")
    y = op(torch.rand(1, 3, 32, 32) * 2 - 1)
    for space in ("pixel", "latent"):
        objective = MeasurementFidelity(op, y, space=space)
        objective.bind(model, 32, 32)
        z = torch.randn(1, 4, 4, 4)
        loss, grad = objective_gradient(objective, model, z)
        assert loss.shape == (1,) and grad.shape == z.shape and torch.isfinite(grad).all()
        assert all(p.grad is None for p in model.pipeline.vae.parameters())
    latent = MeasurementFidelity(op, y, space="latent")
    latent.bind(model, 32, 32)
    assert latent.loss(latent._target).item() == pytest.approx(0.0)  # the encoded observation is the minimum


def test_transformers_classifier_with_its_processor_in_torch():
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)
    classifier = ViTForImageClassification(config).eval()
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6],
                                  image_std=[0.2, 0.25, 0.3])
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    preprocess = transformers_preprocess(processor)
    # the torch preprocessing equals the processor's own (up to its PIL-free resize) on an image of its size
    small = torch.rand(1, 3, 16, 16)
    reference = processor(images=small, return_tensors="pt", do_rescale=False, do_resize=False)["pixel_values"]
    torch.testing.assert_close(preprocess(small * 2 - 1), reference, rtol=1e-5, atol=1e-5)
    objective = ClassifierObjective(classifier, label=2, preprocess=preprocess)
    loss = objective.loss(image)
    expected = -torch.log_softmax(classifier(preprocess(image)).logits, 1)[:, 2]
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="label 3 is out of range for a classifier with 3 classes"):
        ClassifierObjective(classifier, label=3)


def test_reward_objective_is_the_negative_reward():
    objective = RewardObjective(lambda x: x.mean(dim=(1, 2, 3)), weight=2.0)
    x = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(objective.loss(x), -2 * x.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("method", ["unguided", "pseudo_inverse"])
def test_floor_methods_run_on_tiny_backbones_and_are_seeded(method):
    op = make_operator("inpaint_box:fraction=0.25")
    y = op(torch.rand(1, 3, 32, 32) * 2 - 1)
    for model in tiny_models():
        run = get_method(method)
        outs = [run(model, MeasurementFidelity(op, y), num_steps=2, height=32, width=32, progress=False,
                    generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
        assert outs[0].image.shape == (1, 3, 32, 32)
        assert torch.equal(outs[0].x, outs[1].x)
        if method == "unguided":
            assert not torch.equal(outs[0].x, outs[2].x) and outs[0].nfe == 2
        else:
            assert outs[0].nfe == 0


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method 'flowcef'; did you mean 'flowchef'"):
        get_method("flowcef")
    with pytest.raises(ValueError, match=r"no option\(s\) \['lr'\]"):
        get_method("flowchef", lr=0.1)
