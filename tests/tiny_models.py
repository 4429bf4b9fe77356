"""Tiny, randomly initialised SD3 / SD3.5 / FLUX.1 components built from config, fully offline.

Architectures follow the real checkpoints in miniature (VAE with 8x downsampling, CLIP-L/CLIP-G-like pair plus
T5 for SD3, CLIP + T5 for Flux, schedulers configured like the released models), so the adapters are checked
against the diffusers pipelines on the same code paths the full-size models take. Nothing is downloaded:
tokenizers are word-level vocabularies built with the ``tokenizers`` library.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

PROMPT = "a photo of a red fox sitting in the snow"
NEGATIVE = "blurry low quality painting"

_WORDS = (
    "a an the of in on at with and photo painting portrait picture image red green blue white black fox cat dog "
    "sitting standing running snow grass forest city street high low quality blurry sharp detailed face bird "
    "house tree sky sun night day beautiful ugly deformed"
).split()

# Real checkpoint VAE constants (SD3 and FLUX.1); the tiny VAEs use them so the (un)scaling is exercised.
SD3_VAE_SCALE, SD3_VAE_SHIFT = 1.5305, 0.0609
FLUX_VAE_SCALE, FLUX_VAE_SHIFT = 0.3611, 0.1159


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with CLIP (bos 0, pad 1, eos 2, 77 tokens) or T5 (pad 0, eos 1, 512) ids."""
    if kind == "clip":
        specials = ["<|startoftext|>", "<pad>", "<|endoftext|>", "<unk>"]
        max_length = 77
    elif kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
        max_length = 512
    else:
        raise ValueError(f"kind must be 'clip' or 't5', got {kind!r}")
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":
        backend.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 2)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<pad>",
            unk_token="<unk>",
            model_max_length=max_length,
        )
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


def tiny_vae(latent_channels: int = 4, scaling_factor: float = SD3_VAE_SCALE, shift_factor: float = SD3_VAE_SHIFT):
    """AutoencoderKL with four levels (8x downsampling, like the real ones) and a few channels."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def tiny_taesd(latent_channels: int = 4, scaling_factor: float = SD3_VAE_SCALE, shift_factor: float = SD3_VAE_SHIFT):
    """AutoencoderTiny (TAESD-style) with 8x downsampling, a cheap stand-in decoder."""
    torch.manual_seed(0)
    return AutoencoderTiny(
        encoder_block_out_channels=(4, 4, 4, 4),
        decoder_block_out_channels=(4, 4, 4, 4),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _eval(components: dict) -> dict:
    """Modules built from config start in training mode (T5 has dropout); loaded checkpoints are in eval mode."""
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def _clip_config(hidden_size: int, heads: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        vocab_size=1000,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=heads,
        num_hidden_layers=3,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=projection_dim,
        max_position_embeddings=77,
    )


def tiny_t5(d_model: int = 32) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=1000,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def sd3_components(t5: bool = True, sd35: bool = False, patch_size: int = 1) -> dict:
    """Components of a tiny StableDiffusion3Pipeline.

    CLIP-L-like (hidden 8) and CLIP-G-like (hidden 16) hidden states concatenate to 24 < 32 and are zero-padded
    to T5's width (the transformer's joint_attention_dim), as 768 + 1280 are padded to 4096 in the real model;
    their projections (24 + 40) concatenate to the pooled width 64. ``sd35`` adds the SD3.5 dual attention and
    RMS qk-norm. The scheduler is configured like the released checkpoints (static shift 3).
    """
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=patch_size,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModelWithProjection(_clip_config(8, 2, 24))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(16, 4, 40))
    return _eval({
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "vae": tiny_vae(4, SD3_VAE_SCALE, SD3_VAE_SHIFT),
        "text_encoder": text_encoder,
        "tokenizer": word_tokenizer("clip"),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": word_tokenizer("clip"),
        "text_encoder_3": tiny_t5(32) if t5 else None,
        "tokenizer_3": word_tokenizer("t5") if t5 else None,
    })


def sd3_pipeline(**kwargs) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(**sd3_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_scheduler(dev: bool) -> FlowMatchEulerDiscreteScheduler:
    """The released FLUX.1 scheduler configs: dev shifts with the image size, schnell does not shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )


def flux_components(dev: bool = True) -> dict:
    """Components of a tiny FluxPipeline: dev-like (guidance embedding, dynamic shift) or schnell-like.

    The VAE has 4 latent channels, packed 2x2 into 16 transformer input channels (16 -> 64 in the real model).
    """
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=dev,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_clip_config(32, 4, 32))
    return _eval({
        "transformer": transformer,
        "scheduler": flux_scheduler(dev),
        "vae": tiny_vae(4, FLUX_VAE_SCALE, FLUX_VAE_SHIFT),
        "text_encoder": text_encoder,
        "tokenizer": word_tokenizer("clip"),
        "text_encoder_2": tiny_t5(32),
        "tokenizer_2": word_tokenizer("t5"),
    })


def flux_pipeline(dev: bool = True) -> FluxPipeline:
    pipe = FluxPipeline(**flux_components(dev))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(channels: int = 4) -> UNet2DModel:
    """A small unconditional UNet2DModel used as a generic velocity network."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


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
