"""diffusers' callback_on_step_end contract in flowsteer's loops: the same calls, tensors and effects as the
pipeline's own loop, with diffusers' own callback classes (SD3CFGCutoffCallback, MultiPipelineCallbacks)."""

import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, SD3CFGCutoffCallback
from tiny_models import NEGATIVE, PROMPT

from guidance import get_method, load_model, sample
from guidance.objectives import MeasurementFidelity
from operators import make_operator

ATOL = 1e-5
SIZE = 32
STEPS = 4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _sd3_runs(sd3, callback, **extra):
    """(the pipeline's latent, flowsteer's latent) of one SD3 run with ``callback`` on both."""
    common = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="latent")
    ref = sd3.pipeline(PROMPT, negative_prompt=NEGATIVE, generator=_gen(), callback_on_step_end=callback(),
                       **common, **extra).images
    ours = sample(sd3, prompt=PROMPT, negative_prompt=NEGATIVE, generator=_gen(), progress=False,
                  callback_on_step_end=callback(), **common, **extra).images
    return ref, ours


def test_sd3_cfg_cutoff_callback_gives_the_pipelines_result(sd3):
    ref, ours = _sd3_runs(sd3, lambda: SD3CFGCutoffCallback(cutoff_step_ratio=0.5))
    assert (ours - ref).abs().max() <= ATOL
    # the cutoff changes the result (the comparison would catch a callback that did nothing)
    plain = sample(sd3, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=STEPS,
                   height=SIZE, width=SIZE, generator=_gen(), progress=False, output_type="latent").images
    assert (plain - ref).abs().max() > 100 * ATOL


def test_a_callback_sees_the_pipelines_steps_timesteps_and_tensors(sd3):
    seen = {"pipeline": [], "flowsteer": []}

    def recorder(where):
        def callback(pipe, step, timestep, kwargs):
            seen[where].append((step, float(timestep), pipe.num_timesteps, kwargs["latents"].clone(),
                                kwargs["prompt_embeds"].clone(), pipe.do_classifier_free_guidance))
            return kwargs
        return callback

    inputs = ["latents", "prompt_embeds"]
    common = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="latent",
                  callback_on_step_end_tensor_inputs=inputs)
    sd3.pipeline(PROMPT, negative_prompt=NEGATIVE, generator=_gen(), callback_on_step_end=recorder("pipeline"),
                 **common)
    sample(sd3, prompt=PROMPT, negative_prompt=NEGATIVE, generator=_gen(), progress=False,
           callback_on_step_end=recorder("flowsteer"), **common)
    assert len(seen["flowsteer"]) == len(seen["pipeline"]) == STEPS
    for (s0, t0, n0, x0, e0, g0), (s1, t1, n1, x1, e1, g1) in zip(seen["pipeline"], seen["flowsteer"]):
        assert (s0, n0, g0) == (s1, n1, g1) and abs(t0 - t1) < 1e-3
        assert (x0 - x1).abs().max() <= ATOL and e0.shape == e1.shape and torch.equal(e0, e1.to(e0.dtype))


def test_returned_latents_replace_the_state_in_the_pipelines_layout(flux):
    def halve_at_one(pipe, step, timestep, kwargs):
        if step == 1:
            kwargs["latents"] = kwargs["latents"] * 0.5
        return kwargs

    common = dict(num_inference_steps=3, height=64, width=64, max_sequence_length=48, guidance_scale=4.0)
    packed = flux.pipeline(PROMPT, generator=_gen(), output_type="latent", callback_on_step_end=halve_at_one,
                           **common).images
    ours = sample(flux, prompt=PROMPT, generator=_gen(), progress=False, output_type="latent",
                  callback_on_step_end=halve_at_one, **common).images
    assert (flux.pipeline_latents(ours) - packed).abs().max() <= ATOL


def test_interrupting_stops_at_the_pipelines_latent(sd3):
    def stop_after_one(pipe, step, timestep, kwargs):
        if step == 1:
            pipe._interrupt = True
        return kwargs

    ref, ours = _sd3_runs(sd3, lambda: stop_after_one)
    assert (ours - ref).abs().max() <= ATOL
    x = torch.rand(1, 3, SIZE, SIZE, generator=_gen(1)) * 2 - 1
    op = make_operator("sr:factor=2")
    result = get_method("flowchef", step_size=0.5)(sd3, MeasurementFidelity(op, op(x)), num_steps=STEPS, height=SIZE,
                                                   width=SIZE, generator=_gen(), progress=False,
                                                   callback_on_step_end=stop_after_one)
    assert result.info["interrupted_after_step"] == 1 and result.nfe == 2 and result.sigmas.shape == (3,)
    assert result.image.shape == (1, 3, SIZE, SIZE)


def test_multiple_callbacks_and_flowsteers_own_callback_run_together(sd3):
    calls = []

    def own(step, sigma, state):
        calls.append(("own", step))
        return state

    class Count(SD3CFGCutoffCallback):
        def callback_fn(self, pipe, step, timestep, kwargs):
            calls.append(("diffusers", step))
            return super().callback_fn(pipe, step, timestep, kwargs)

    both = MultiPipelineCallbacks([Count(cutoff_step_ratio=0.5)])
    sample(sd3, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=2, height=SIZE,
           width=SIZE, generator=_gen(), progress=False, on_step_end=own, callback_on_step_end=both)
    assert calls == [("own", 0), ("diffusers", 0), ("own", 1), ("diffusers", 1)]


def test_callback_errors_are_one_line(sd3):
    run = dict(num_inference_steps=2, height=SIZE, width=SIZE, progress=False, generator=_gen())
    keep = lambda pipe, step, timestep, kwargs: kwargs  # noqa: E731
    with pytest.raises(ValueError, match=r"not offered by SD3Model: it offers \['latents', 'prompt_embeds'"):
        sample(sd3, prompt=PROMPT, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["noise"], **run)
    with pytest.raises(ValueError, match="does nothing without callback_on_step_end"):
        sample(sd3, prompt=PROMPT, callback_on_step_end_tensor_inputs=["latents"], **run)
    with pytest.raises(ValueError, match=r"flowsteer's callback\(step, sigma, state\) -> state is on_step_end="):
        sample(sd3, prompt=PROMPT, callback_on_step_end=lambda step, sigma, state: state, **run)
    with pytest.raises(ValueError, match="must return the callback_kwargs dict"):
        sample(sd3, prompt=PROMPT, callback_on_step_end=lambda pipe, step, t, kwargs: None, **run)
    default = load_model("default")
    with pytest.raises(ValueError, match=r"offers \['latents'\]"):
        sample(default, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["prompt_embeds"],
               num_inference_steps=2, progress=False, generator=_gen())
