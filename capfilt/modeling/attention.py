"""Cross-attention and KV-cache plumbing of capfilt's BLIP text model (blip.py).

`ImageKeysValues` holds every cross-attention layer's keys/values of some images, computed once
per image, and the row -> image layout (`ImageGroups`) that lets each image's text rows (the K
samples of a caption, the candidate texts of the filter) read them in one attention call without
a per-text copy. `DecoderCache` is the causal decoder's self-attention KV cache, preallocated to
the longest sequence and written in place. No weights live here: blip.py's modules call these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capfilt.modeling.loading import index_tensor


class ImageGroups:
    """Which image each text row attends to, as a layout for one grouped attention call.

    ``rows[t]`` is the index (into the stored per-image keys/values) of text row t. Rows of one
    image are packed into a (images, size) grid and become extra query positions of one attention
    call against that image's keys/values, so no per-text copy of them is ever made. Unused grid
    cells are zero queries whose output is dropped. Built on the host from a Python list, so
    making it never syncs the device.
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
            grid = query.reshape(images, size, heads, length, dim)  # rows = images x size, in order
        else:
            grid = query.new_zeros(images * size, heads, length, dim).index_copy_(0, self.cells, query)
            grid = grid.view(images, size, heads, length, dim)  # each row in its image's cell
        # an image's rows become query positions of one call: (images, heads, size * L, head_size)
        grid = grid.transpose(1, 2).reshape(images, heads, size * length, dim)
        out = F.scaled_dot_product_attention(grid, key, value)  # keys/values (images, heads, S, head_size)
        # back to one entry per cell: (images, heads, size, L, d) -> (images * size, heads, L, head_size)
        out = out.view(images, heads, size, length, dim).transpose(1, 2).reshape(images * size, heads, length, dim)
        return out if self.dense else out.index_select(0, self.cells)


class ImageKeysValues:
    """Every cross-attention layer's keys/values of some images (computed once per image), and
    the row -> image layout of the texts that read them."""

    def __init__(self, per_layer: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int]):
        self.per_layer, self.rows = per_layer, list(rows)
        device = per_layer[0][0].device
        self.groups = ImageGroups(self.rows, device)
        if self.groups.images != list(range(per_layer[0][0].shape[0])):  # some images have no text row
            present = index_tensor(self.groups.images, device)
            per_layer = [(k.index_select(0, present), v.index_select(0, present)) for k, v in per_layer]
        self._present = per_layer

    def attend(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        key, value = self._present[layer]
        return self.groups.attend(query, key, value)

    def for_rows(self, rows: list[int]) -> ImageKeysValues:
        """The same images' keys/values (not recomputed, not copied) read by other text rows."""
        return ImageKeysValues(self.per_layer, rows)

    def keep(self, positions: list[int]) -> ImageKeysValues:
        """Only the text rows at ``positions`` (finished rows leave a decoding batch)."""
        return self.for_rows([self.rows[i] for i in positions])


class DecoderCache:
    """Self-attention keys/values of a decoding batch, preallocated to the longest sequence."""

    def __init__(self, layers: int, max_length: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length, self.max_length = 0, max_length

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store this step's keys/values; returns every position's so far."""
        end = self.length + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"decoder cache holds {self.max_length} positions, step needs {end}")
        if self.keys[layer] is None:
            shape = (key.shape[0], key.shape[1], self.max_length, key.shape[3])
            self.keys[layer], self.values[layer] = key.new_empty(shape), value.new_empty(shape)
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows in ``index`` (finished rows leave the batch)."""
        self.keys = [k.index_select(0, index) if k is not None else None for k in self.keys]
        self.values = [v.index_select(0, index) if v is not None else None for v in self.values]
