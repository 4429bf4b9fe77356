"""load_model: pipeline folders written by save_pretrained, pipeline objects, and the errors for missing models."""

import json

import huggingface_hub
import pytest
import torch
from tiny_models import NEGATIVE, PROMPT, flux_components, flux_pipeline, sd3_pipeline, tiny_taesd, tiny_unet, tiny_vae
from diffusers import AutoencoderTiny, FlowMatchEulerDiscreteScheduler, FluxPipeline

from guidance.loading.models import ModelNotFoundError, load_model
from guidance.backbones.flux import FluxModel
from guidance.backbones.generic import GenericFlowModel
from guidance.backbones.sd3 import SD3Model
from guidance.sampler import sample


@pytest.fixture
def offline(monkeypatch):
    """Make sure nothing reaches the network, whatever the environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _latents(model, cond, size):
    return sample(model, cond, num_steps=2, height=size, width=size, generator=torch.Generator().manual_seed(0),
                  progress=False, decode=False).x


def test_sd3_folder_round_trip(tmp_path, offline):
    pipe = sd3_pipeline()
    pipe.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    assert list((tmp_path / "sd3" / "transformer").glob("*.safetensors"))
    loaded = load_model(tmp_path / "sd3", local_files_only=True)
    assert isinstance(loaded, SD3Model)
    original = SD3Model(pipe)
    a = _latents(original, original.condition(PROMPT, NEGATIVE, 5.0), 32)
    b = _latents(loaded, loaded.condition(PROMPT, NEGATIVE, 5.0), 32)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    without_t5 = load_model(str(tmp_path / "sd3"), local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    assert without_t5.pipeline.text_encoder_3 is None
    cond = without_t5.condition(PROMPT, NEGATIVE, 5.0)
    assert torch.all(cond.prompt_embeds[:, 77:] == 0)  # T5 tokens are zeros without T5


def test_flux_folder_round_trip(tmp_path, offline):
    pipe = flux_pipeline(dev=True)
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_model(tmp_path / "flux", local_files_only=True, dtype=torch.float32, device="cpu")
    assert isinstance(loaded, FluxModel) and loaded.has_guidance_embedding
    original = FluxModel(pipe)
    a = _latents(original, original.condition(PROMPT, max_sequence_length=32), 64)
    b = _latents(loaded, loaded.condition(PROMPT, max_sequence_length=32), 64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_generic_folder_round_trip(tmp_path, offline):
    root = tmp_path / "generic"
    unet, vae = tiny_unet(4), tiny_vae(4)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=2.0).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "MyFlowPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    model = load_model(root, local_files_only=True, timestep_scale=1000.0)
    assert isinstance(model, GenericFlowModel) and model.timestep_scale == 1000.0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unet(x, torch.tensor([400.0])).sample
    torch.testing.assert_close(model.velocity(x, 0.4), expected, rtol=0, atol=1e-6)
    assert model.sigmas(3)[1] > 2 / 3  # the saved scheduler's shift is used


def test_pipeline_object_is_reused_not_reloaded(tmp_path):
    pipe = sd3_pipeline()
    model = load_model(pipe)
    assert isinstance(model, SD3Model) and model.pipeline is pipe and model.transformer is pipe.transformer
    flux = flux_pipeline(dev=False)
    model = load_model(flux)
    assert isinstance(model, FluxModel) and not model.has_guidance_embedding
    assert load_model(model) is model


def test_tiny_decoder_from_folder(tmp_path, offline):
    tiny_taesd().save_pretrained(tmp_path / "taesd")
    model = load_model(sd3_pipeline(), decoder=tmp_path / "taesd", local_files_only=True)
    assert isinstance(model.codec.decoder, AutoencoderTiny) and model.codec.autoencoder is model.pipeline.vae
    assert model.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 32, 32)


# -- errors -------------------------------------------------------------------------------------------------


def test_missing_folder_gives_clear_error(tmp_path, offline):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no such folder") as info:
        load_model(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)


def test_hub_id_offline_gives_clear_error(offline):
    with pytest.raises(ModelNotFoundError) as info:
        load_model("someone-unknown/tiny-flow-model-not-cached")
    message = str(info.value)
    assert "someone-unknown/tiny-flow-model-not-cached" in message
    assert "hf download someone-unknown/tiny-flow-model-not-cached" in message and "local folder" in message
    assert info.value.__suppress_context__  # no chained hub traceback


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_decoder_gives_clear_error(offline):
    with pytest.raises(ModelNotFoundError, match="hf download madebyollin/taesd3"):
        load_model(sd3_pipeline(), decoder="madebyollin/taesd3")


@pytest.mark.parametrize("source", [42, object(), ["a/b"]])
def test_unknown_source_kind_raises(source):
    with pytest.raises(ValueError, match="unknown model source"):
        load_model(source)


def test_unsupported_folder_raises(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                           "text_encoder": ["transformers", "CLIPTextModel"],
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match="unsupported pipeline 'StableDiffusionPipeline'"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="no model_index.json"):
        load_model(tmp_path / ".." / tmp_path.name / "..")


@pytest.mark.parametrize("class_name, reason", [
    ("FluxFillPipeline", "384 input channels"),
    ("FluxPriorReduxPipeline", "image encoder"),
    ("QwenImageEditPipeline", "input image's tokens"),
    ("StableDiffusion3ControlNetPipeline", "control image"),
])
def test_pipelines_that_need_other_inputs_are_refused_with_the_reason(tmp_path, class_name, reason):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name,
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"],
                                                           "text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(ValueError, match=f"{class_name} is not supported: .*{reason}.*Supported pipelines: "
                                         f"StableDiffusion3Pipeline"):
        load_model(tmp_path)


def test_a_refused_pipeline_object_is_refused_although_its_transformer_is_known():
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline(**flux_components(dev=True))
    with pytest.raises(ValueError, match="FluxFillPipeline is not supported: .*384 input channels.*FluxPipeline"):
        load_model(pipe)


def test_flux_kontext_weights_sample_text_to_image_as_flux():
    """A FluxKontextPipeline without a reference image is FLUX.1 text-to-image: flowsteer reproduces its output."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**flux_components(dev=True))
    pipe.set_progress_bar_config(disable=True)
    model = load_model(pipe)
    assert isinstance(model, FluxModel)
    packed = pipe(prompt=PROMPT, height=32, width=32, max_area=32 * 32, num_inference_steps=2, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(0), output_type="latent").images
    out = sample(model, model.condition(PROMPT, max_sequence_length=16), num_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), progress=False)
    reference = FluxPipeline._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)
    assert (out.x - reference).abs().max() <= 1e-5
