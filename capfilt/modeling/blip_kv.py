"""Shared cross-attention keys/values: compute them once per image, reuse them for all its texts.

Stock BLIP recomputes every cross-attention key/value projection of the image tokens for each
(image, text) row. Here the projections run once on the B images and are gathered to the T text
rows, then handed to the stock text model through its own `EncoderDecoderCache`, which skips the
projection when the cross-attention cache is already filled. The stock modules do all the math.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


def _heads(linear: torch.nn.Linear, states: torch.Tensor, head_size: int) -> torch.Tensor:
    batch, length, _ = states.shape
    return linear(states).view(batch, length, -1, head_size).transpose(1, 2)


def shared_cross_attention(text_model, image_embeds: torch.Tensor, rows: torch.Tensor) -> EncoderDecoderCache:
    """A cache whose cross-attention part holds the image K/V of ``image_embeds[rows]``.

    ``text_model`` is a `BlipTextModel`; ``rows[t]`` is the image index of text row t.
    """
    per_layer = []
    for layer in text_model.encoder.layer:
        attn = layer.crossattention.self
        keys = _heads(attn.key, image_embeds, attn.attention_head_size)
        values = _heads(attn.value, image_embeds, attn.attention_head_size)
        per_layer.append((keys.index_select(0, rows), values.index_select(0, rows)))
    return EncoderDecoderCache(DynamicCache(), DynamicCache(per_layer))


def image_placeholder(image_embeds: torch.Tensor, rows: int) -> torch.Tensor:
    """The `encoder_hidden_states` argument once K/V are cached: only its batch size is read.

    A zero-copy view, so no (texts x image tokens x width) tensor is materialised.
    """
    return image_embeds[:1].expand(rows, -1, -1)
