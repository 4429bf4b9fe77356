"""A bf16 backbone with float32 solver state."""

import torch

from guidance import SD3Model, sample
from tiny_models import sd3_pipeline


def test_bf16_backbone_keeps_float32_state_and_tracks_the_bf16_pipeline():
    pipe = sd3_pipeline(t5=True).to(torch.bfloat16)
    model = SD3Model(pipe)
    assert model.dtype == torch.bfloat16
    cond = model.condition("a cat", "blurry", 5.0)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    v = model.velocity(x, 0.5, cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()

    out = sample(model, cond, num_steps=3, height=32, width=32, generator=torch.Generator().manual_seed(1),
                 progress=False)
    assert out.x.dtype == torch.float32 and out.image.dtype == torch.float32
    reference = pipe("a cat", negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=3, height=32,
                     width=32, generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert reference.dtype == torch.bfloat16
    # the pipeline rounds its state to bf16 after every step; ours stays float32, so they agree to bf16 precision
    error = (out.x - reference.float()).abs().max() / reference.float().abs().max()
    assert error < 0.05, error
