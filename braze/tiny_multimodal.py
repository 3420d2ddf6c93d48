"""Tiny random-weight multimodal checkpoints (Gemma 3 and Gemma 4 ``*ForConditionalGeneration``)
for the tests: the text model is :func:`braze.tiny.tiny_config`'s, with a small vision tower
(and for Gemma 4 an audio tower) beside it, saved as transformers saves the real ones.

The chat template goes to ``chat_template.json`` (the processor's file, where the published
multimodal checkpoints keep it), not into tokenizer_config.json. Image, video and audio
placeholder ids are the top of the tiny vocabulary (253-255), above the ids tests prompt with.
"""

from __future__ import annotations

import json
import pathlib

import torch

from .tiny import CHAT_TEMPLATE, _init_weights, make_tokenizer, tiny_config

FAMILIES = ("gemma3", "gemma4")
IMAGE_ID, AUDIO_ID, VIDEO_ID = 255, 254, 253
# distinct from braze.tiny's template, so a test can tell which file was read
MULTIMODAL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("': '", "' says: '")


def multimodal_config(family: str, **text_overrides):
    """A tiny ``Gemma3Config`` / ``Gemma4Config``; ``text_overrides`` go to the text config."""
    import transformers as tf

    text = tiny_config(family, **text_overrides)
    text.architectures = None
    tie = text.tie_word_embeddings        # the wrapper ties its head by its own flag
    if family == "gemma3":
        vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               image_token_id=IMAGE_ID, boi_token_index=IMAGE_ID - 2,
                               eoi_token_index=IMAGE_ID - 1, tie_word_embeddings=tie,
                               architectures=["Gemma3ForConditionalGeneration"])
    if family == "gemma4":
        vision = tf.Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                       patch_size=4, pooling_kernel_size=2,
                                       position_embedding_size=64)
        audio = tf.Gemma4AudioConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     subsampling_conv_channels=[4, 4], output_proj_dims=16)
        return tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio,
                               image_token_id=IMAGE_ID, audio_token_id=AUDIO_ID,
                               video_token_id=VIDEO_ID, boi_token_id=250, eoi_token_id=251,
                               boa_token_id=252, eoa_token_index=249, tie_word_embeddings=tie,
                               architectures=["Gemma4ForConditionalGeneration"])
    raise ValueError(f"unknown multimodal family {family!r}; expected one of {FAMILIES}")


def make_multimodal_checkpoint(family: str, out_dir, seed: int = 0, with_tokenizer: bool = True,
                               max_shard_size: str | None = None,
                               **text_overrides) -> pathlib.Path:
    """Build, randomly initialise and save a tiny ``family`` ConditionalGeneration checkpoint."""
    from transformers import AutoModelForImageTextToText

    config = multimodal_config(family, **text_overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    _init_weights(model, seed)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **({} if max_shard_size is None else
                                  {"max_shard_size": max_shard_size}))
    if with_tokenizer:
        make_tokenizer(out, vocab_size=config.text_config.vocab_size)
        cfg_path = out / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text())
        tok_cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (out / "chat_template.json").write_text(
            json.dumps({"chat_template": MULTIMODAL_CHAT_TEMPLATE}, indent=2) + "\n")
    return out
