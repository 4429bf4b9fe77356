"""Test helpers over the random-weight backbones, whose builders live in ``tasks.random_models`` (the SD3 and
FLUX.1 ones and what the families share re-exported here, so tests import them from one place)."""

from __future__ import annotations

import contextlib

import torch

from tasks.random_models.common import *  # noqa: F401,F403
from tasks.random_models.flux import *  # noqa: F401,F403
from tasks.random_models.sd3 import *  # noqa: F401,F403
from tasks.random_models.common import (  # noqa: F401  (the names tests and demos import)
    FLUX_VAE_SCALE,
    FLUX_VAE_SHIFT,
    NEGATIVE,
    PROMPT,
    SD3_VAE_SCALE,
    SD3_VAE_SHIFT,
    tiny_taesd,
    tiny_unet,
    tiny_vae,
    word_tokenizer,
)
from tasks.random_models.flux import flux_components, flux_pipeline  # noqa: F401
from tasks.random_models.sd3 import sd3_components, sd3_pipeline  # noqa: F401


@contextlib.contextmanager
def autograd_calls(module: torch.nn.Module):
    """Record, for every forward call of ``module`` inside the block, (grad enabled?, output requires grad?,
    gradient checkpointing on?)."""
    calls = []

    def hook(m, inputs, output):
        output = output[0] if isinstance(output, tuple) else output.sample
        calls.append((torch.is_grad_enabled(), output.requires_grad, bool(getattr(m, "is_gradient_checkpointing", False))))

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def text_case(request, kind: str, flux_size: int = 64):
    """(model, condition, image size) for the session fixture ``kind`` ("sd3" or "flux")."""
    model = request.getfixturevalue(kind)
    if kind == "sd3":
        return model, model.condition(PROMPT, NEGATIVE, 5.0), 32
    return model, model.condition(PROMPT, max_sequence_length=32), flux_size


def measured_fidelity(spec: str, size: int, space: str = "pixel", seed: int = 5):
    """A noiseless measurement of a random size×size image through the operator ``spec``, as an objective."""
    from guidance import MeasurementFidelity
    from operators import make_operator

    op = make_operator(spec)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return MeasurementFidelity(op, op(image), space=space)
