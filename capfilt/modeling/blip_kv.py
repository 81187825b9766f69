"""Shared cross-attention keys/values: computed once per image, used by all of its texts.

Stock BLIP recomputes every cross-attention key/value projection of the image tokens for each
(image, text) row. Here the projections run once on the B images (`image_keys_values`) and are
handed to the stock text model through its own `EncoderDecoderCache`, which skips the projection
when the cross-attention cache is already filled. The stock modules do all the math.

With the SDPA attention forward (attention.py) the keys/values stay one copy per image and the
rows are described by an `ImageGroups` layout; with the stock eager forward they are gathered to
one copy per text row, which is what the stock forward expects.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from capfilt.modeling.attention import GroupedCrossCache, ImageGroups, sdpa_enabled
from capfilt.modeling.loading import index_tensor

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per text layer: (B, heads, image tokens, head size)


def _heads(linear: torch.nn.Linear, states: torch.Tensor, head_size: int) -> torch.Tensor:
    batch, length, _ = states.shape
    return linear(states).view(batch, length, -1, head_size).transpose(1, 2)


def image_keys_values(text_model, image_embeds: torch.Tensor) -> KeysValues:
    """Every cross-attention layer's keys and values of the B images, once per image."""
    out = []
    for layer in text_model.encoder.layer:
        attn = layer.crossattention.self
        out.append((_heads(attn.key, image_embeds, attn.attention_head_size),
                    _heads(attn.value, image_embeds, attn.attention_head_size)))
    return out


def grouped(text_model) -> bool:
    """Whether the text model's cross-attention runs the SDPA forward that takes per-image K/V."""
    return all(sdpa_enabled(layer.crossattention.self) for layer in text_model.encoder.layer)


def _as_list(rows) -> list[int]:
    return rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]


def cross_attention_cache(text_model, kv: KeysValues, rows, self_cache: DynamicCache | None = None
                          ) -> EncoderDecoderCache:
    """A cache whose cross-attention part serves text row t with the K/V of image ``rows[t]``."""
    rows = _as_list(rows)
    self_cache = self_cache if self_cache is not None else DynamicCache()
    device = kv[0][0].device
    if grouped(text_model):
        groups = ImageGroups(rows, device)
        if groups.images != list(range(kv[0][0].shape[0])):
            present = index_tensor(groups.images, device)
            kv = [(k.index_select(0, present), v.index_select(0, present)) for k, v in kv]
        return GroupedCrossCache(self_cache, DynamicCache(kv), groups)
    index = index_tensor(rows, device)
    gathered = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]
    return EncoderDecoderCache(self_cache, DynamicCache(gathered))


def shared_cross_attention(text_model, image_embeds: torch.Tensor, rows) -> EncoderDecoderCache:
    """A cache whose cross-attention part holds the image K/V of ``image_embeds[rows]``.

    ``text_model`` is a `BlipTextModel`; ``rows[t]`` is the image index of text row t.
    """
    return cross_attention_cache(text_model, image_keys_values(text_model, image_embeds), rows)


def keep_rows(text_model, cache: EncoderDecoderCache, kv: KeysValues, rows: list[int], keep: list[int]
              ) -> EncoderDecoderCache:
    """The cache of the rows at positions ``keep`` (self-attention history kept, cross K/V reused).

    ``kv`` are the per-image keys/values the cache was built from and ``rows`` its row->image map.
    """
    self_cache = cache.self_attention_cache
    self_cache.batch_select_indices(index_tensor(keep, kv[0][0].device))
    return cross_attention_cache(text_model, kv, [rows[i] for i in keep], self_cache)


def image_placeholder(image_embeds: torch.Tensor, rows: int) -> torch.Tensor:
    """The `encoder_hidden_states` argument once K/V are cached: only its batch size is read.

    A zero-copy view, so no (texts x image tokens x width) tensor is materialised.
    """
    return image_embeds[:1].expand(rows, -1, -1)
