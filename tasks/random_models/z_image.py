"""Randomly initialised Z-Image components built from config, fully offline.

A tiny ``ZImagePipeline`` (``tiny_z_image_pipeline``): the real architecture in miniature, a single-stream DiT
(``ZImageTransformer2DModel``, 2x2 patches, 3-axis rotary positions, Qwen3 caption features) over the 16-channel
FLUX.1-style VAE (f = 8, FLUX.1's scale and shift), a two-layer ``Qwen3Model`` text encoder and a word-level
tokenizer with Qwen's chat markers and a chat template, so that the pipeline's own ``encode_prompt`` (chat template,
``max_length`` padding, ``hidden_states[-2]`` cut to the attention mask) runs unchanged. The outputs mean nothing;
the adapter is checked against the pipeline on the code paths the released checkpoints take.

:func:`chat_tokenizer` also builds the Gemma-style tokenizer of the tiny Lumina 2 pipeline
(``tasks.random_models.lumina2``). Nothing is downloaded: tokenizers are word-level vocabularies built with the
``tokenizers`` library.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from .common import FLUX_VAE_SCALE, FLUX_VAE_SHIFT, tiny_vae, word_tokenizer

__all__ = ["QWEN_CHAT_TEMPLATE", "chat_tokenizer", "qwen_tokenizer", "tiny_qwen3", "tiny_z_image_components",
           "tiny_z_image_pipeline", "z_image_scheduler"]

#: Qwen3's chat layout (one user turn, then the assistant's header; the empty think block only when thinking is
#: switched off), which ``ZImagePipeline._encode_prompt`` renders with ``enable_thinking=True``.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _words() -> list[str]:
    """The shared test vocabulary (the words of ``tasks.random_models.common``' tokenizers, specials left out)."""
    vocab = word_tokenizer("t5").get_vocab()
    return [w for w, _ in sorted(vocab.items(), key=lambda item: item[1]) if w not in ("<pad>", "</s>", "<unk>")]


def chat_tokenizer(specials: list[str], extra_words: tuple[str, ...] = (), bos: str | None = None,
                   eos: str | None = None, pad: str = "<pad>", unk: str = "<unk>", chat_template: str | None = None,
                   max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ``specials`` first (ids 0, 1, ...; kept whole inside text), then the test words and
    ``extra_words``. With ``bos`` every sequence starts with it (Gemma); right padding with ``pad``."""
    words = [w for w in dict.fromkeys(_words() + list(extra_words)) if w not in specials]
    vocab = {token: i for i, token in enumerate(list(specials) + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(specials))
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    named = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, unk_token=unk,
                                        model_max_length=max_length, padding_side="right", **named)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's markers (``<|endoftext|>`` pads, ``<|im_start|>`` / ``<|im_end|>`` frame a turn) and chat template."""
    return chat_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<think>", "</think>"],
                          ("user", "assistant", "system"), eos="<|im_end|>", pad="<|endoftext|>",
                          chat_template=QWEN_CHAT_TEMPLATE)


def tiny_qwen3(hidden_size: int = 16, layers: int = 2, vocab_size: int = 128) -> Qwen3Model:
    """A ``Qwen3Model`` whose hidden states have width ``hidden_size`` (the transformer's ``cap_feat_dim``)."""
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=hidden_size // 2,
                         vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=0)
    return Qwen3Model(config).eval()


def z_image_scheduler(dynamic_shift: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """Z-Image-Turbo's scheduler (static shift 3) or, with ``dynamic_shift``, the image-size shift the pipeline's
    ``mu`` drives (FLUX.1's line through (256, 0.5) and (4096, 1.15))."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=dynamic_shift,
                                           base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                           max_shift=1.15)


def tiny_z_image_components(dynamic_shift: bool = True) -> dict:
    """Components of a tiny ZImagePipeline: 16 latent channels (as the released VAE), 2x2 patches, a 32-wide
    two-layer DiT whose rotary tables cover latents up to 128 x 128 (1024 px, the pipeline's default size), Qwen3
    features of width 16.

    The transformer's padding tokens are created with ``torch.empty``; they are set to ones here (a checkpoint
    holds trained values)."""
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 64, 64],
    )
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    tokenizer = qwen_tokenizer()
    return {
        "transformer": transformer.eval(),
        "vae": tiny_vae(16, FLUX_VAE_SCALE, FLUX_VAE_SHIFT),
        "scheduler": z_image_scheduler(dynamic_shift),
        "text_encoder": tiny_qwen3(16, vocab_size=len(tokenizer)),
        "tokenizer": tokenizer,
    }


def tiny_z_image_pipeline(dynamic_shift: bool = True) -> ZImagePipeline:
    """A float32 CPU ZImagePipeline in eval mode with tiny random components (32 to 1024 px images)."""
    pipe = ZImagePipeline(**tiny_z_image_components(dynamic_shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe
