"""Scaled-dot-product attention for the stock BLIP attention modules: same modules, same weights.

transformers' BLIP vision attention (`BlipAttention`) and text attention (`BlipTextSelfAttention`)
are eager: matmul, softmax, matmul, materialising every (query, key) score. `use_sdpa(model)`
rebinds the `forward` of each such module *instance* to a function below that runs the module's
own projections and then `torch.nn.functional.scaled_dot_product_attention` (flash / memory-
efficient kernels on GPU, a fused kernel on CPU). Classes, parameters and state dicts are
untouched (nothing is forked); `use_sdpa(model, False)` restores the stock forward. Tested equal
to eager within 1e-5 in fp32 (tests/test_perf_paths.py).

The SDPA text forward also understands cross-attention keys/values stored once per image
(`ImageGroups`, built by blip_kv.py): the text rows of one image become extra query positions of
one attention call against that image's keys/values, so no per-text copy of them is ever made.
The SDPA forwards return no attention map (None); a caller that asks for `output_attentions`
gets the stock forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from capfilt.modeling.loading import index_tensor


class ImageGroups:
    """Which image each text row attends to, as a layout for one grouped attention call.

    ``rows[t]`` is the index (into the stored per-image keys/values) of text row t. Rows of one
    image are packed into a (images, size) grid; unused grid cells are zero queries whose output
    is dropped. Built on the host from a Python list, so making it never syncs the device.
    """

    def __init__(self, rows: list[int], device):
        self.rows = list(rows)
        counts: dict[int, int] = {}
        flat = []
        for r in self.rows:
            flat.append((r, counts.get(r, 0)))
            counts[r] = counts.get(r, 0) + 1
        self.images = sorted(counts)  # stored images that have at least one row
        local = {img: i for i, img in enumerate(self.images)}
        self.size = max(counts.values(), default=0)
        cells = [local[r] * self.size + slot for r, slot in flat]
        # Rows already image-major with equal group sizes (the captioner's K samples): a plain view.
        self.dense = cells == list(range(len(cells))) and len(cells) == len(self.images) * self.size
        self.cells = index_tensor(cells, device)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (rows, heads, L, d); key/value (len(self.images), heads, S, d) -> (rows, heads, L, d)."""
        rows, heads, length, dim = query.shape
        images, size = key.shape[0], self.size
        if self.dense:
            grid = query.reshape(images, size, heads, length, dim)
        else:
            grid = query.new_zeros(images * size, heads, length, dim).index_copy_(0, self.cells, query)
            grid = grid.view(images, size, heads, length, dim)
        grid = grid.transpose(1, 2).reshape(images, heads, size * length, dim)
        out = F.scaled_dot_product_attention(grid, key, value)
        out = out.view(images, heads, size, length, dim).transpose(1, 2).reshape(images * size, heads, length, dim)
        return out if self.dense else out.index_select(0, self.cells)


class GroupedCrossCache(EncoderDecoderCache):
    """An `EncoderDecoderCache` whose cross-attention part holds keys/values once per image."""

    def __init__(self, self_attention_cache, cross_attention_cache, groups: ImageGroups):
        super().__init__(self_attention_cache, cross_attention_cache)
        self.groups = groups


def _mask_for(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    # transformers builds eager masks: additive floats. SDPA wants them in the query's dtype.
    if mask is None or mask.dtype == torch.bool or mask.dtype == query.dtype:
        return mask
    return mask.to(query.dtype)


def _vision_sdpa_forward(self: BlipAttention, hidden_states: torch.Tensor, **kwargs):
    if kwargs.get("output_attentions"):
        return BlipAttention.forward(self, hidden_states, **kwargs)
    batch, length, width = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(
        qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
    )
    return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


def _heads(module: BlipTextSelfAttention, linear, states: torch.Tensor) -> torch.Tensor:
    return linear(states).view(*states.shape[:-1], -1, module.attention_head_size).transpose(1, 2)


def _text_sdpa_forward(self: BlipTextSelfAttention, hidden_states, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, past_key_values=None, **kwargs):
    if kwargs.get("output_attentions"):
        return BlipTextSelfAttention.forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                             encoder_attention_mask, past_key_values, **kwargs)
    query = _heads(self, self.query, hidden_states)
    cross = encoder_hidden_states is not None
    mask = encoder_attention_mask if cross else attention_mask  # exactly the stock choice
    # Cache handling mirrors the stock forward line for line.
    layer_cache, reuse = past_key_values, False
    if isinstance(past_key_values, EncoderDecoderCache):
        reuse = cross and past_key_values.is_updated.get(self.layer_idx)
        layer_cache = past_key_values.cross_attention_cache if cross else past_key_values.self_attention_cache
    if reuse:
        key = layer_cache.layers[self.layer_idx].keys
        value = layer_cache.layers[self.layer_idx].values
    else:
        states = encoder_hidden_states if cross else hidden_states
        key, value = _heads(self, self.key, states), _heads(self, self.value, states)
        if past_key_values is not None:
            key, value = layer_cache.update(key, value, self.layer_idx)
            if cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True
    groups = getattr(past_key_values, "groups", None) if cross else None
    if groups is not None:
        if mask is not None:
            raise ValueError("per-image cross-attention keys/values take no encoder attention mask")
        context = groups.attend(query, key, value)
    else:
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=_mask_for(mask, query), dropout_p=self.dropout.p if self.training else 0.0
        )
    return context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size), None


_SDPA_FORWARDS = {BlipAttention: _vision_sdpa_forward, BlipTextSelfAttention: _text_sdpa_forward}


def use_sdpa(model: torch.nn.Module, enabled: bool = True) -> int:
    """Switch every BLIP attention module inside ``model`` to SDPA (or back); returns how many."""
    count = 0
    for module in model.modules():
        forward = _SDPA_FORWARDS.get(type(module))
        if forward is None:
            continue
        if enabled:
            module.forward = types.MethodType(forward, module)
        else:
            module.__dict__.pop("forward", None)
        count += 1
    return count


def sdpa_enabled(module: torch.nn.Module) -> bool:
    """Whether this attention module runs the SDPA forward."""
    bound = module.__dict__.get("forward")
    return getattr(bound, "__func__", None) in _SDPA_FORWARDS.values()
