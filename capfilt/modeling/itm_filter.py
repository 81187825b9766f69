# Adapted from transformers 5.24 models/blip/modeling_blip.py (BlipForImageTextRetrieval.forward)
"""The filter: ITM match probability and ITC cosine, with the weights of a `BlipForImageTextRetrieval`.

Stock `forward` takes one (image, text) pair per row and re-runs the ViT for each. Here (with
capfilt's own compute, blip.py, loaded strictly from the stock checkpoint and checked against it
at load, selfcheck.py) each image is encoded once, its cross-attention K/V are computed once and
shared by all of its texts, and the texts are batched by length; the scores are those of the
stock per-pair forward (tested).

Optional cascade (BLIP's own retrieval trick, applied to filtering): ITC, which needs only the
text encoder and the image's CLS feature, is computed for every text; the costlier ITM pass
(text encoder with cross-attention to all image tokens) runs only for texts whose ITC falls inside
a band [itc_low, itc_high] (`config.CascadeConfig`, the one owner of the rule). `score_detailed`
reports which ITM values were computed, so a caller can tell "not computed" from a score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoProcessor, BlipForImageTextRetrieval

from capfilt.config import CascadeConfig
from capfilt.modeling.blip import BlipRetrieval
from capfilt.modeling.loading import (
    from_pretrained,
    index_tensor,
    inference_autocast,
    pick_device,
    release_freed_memory,
)
from capfilt.modeling.presets import check_vocabulary, resolve_blip


@dataclass
class FilterScores:
    """Per image, arrays aligned with its texts. ``itm`` holds 0.0 where ``itm_computed`` is False
    (never NaN, so a non-finite value always means a model problem); read it through the mask or
    `itm_or_none`."""

    itm: list[np.ndarray]
    itc: list[np.ndarray]
    itm_computed: list[np.ndarray]

    def itm_or_none(self) -> list[list[float | None]]:
        return [[float(v) if ok else None for v, ok in zip(m, c)] for m, c in zip(self.itm, self.itm_computed)]


class ItmFilter:
    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        precision: str = "fp32",
        max_text_tokens: int = 35,
        text_batch_size: int = 256,
        self_check: bool = True,
        kv_images: int = 8,
    ):
        """``self_check``: compare with the stock model on a probe at load and refuse on disagreement."""
        self.ref = resolve_blip(model, "filter", revision)
        self.device = pick_device(device)
        self.precision = precision
        self.max_text_tokens = max_text_tokens  # BLIP truncates filter input to 35 tokens
        self.text_batch_size = text_batch_size
        self.kv_images = max(1, kv_images)  # images whose cross-attention K/V are held at once
        self.processor = AutoProcessor.from_pretrained(self.ref.location, revision=self.ref.revision)
        stock = from_pretrained(BlipForImageTextRetrieval, self.ref.location, self.ref.revision).to(self.device)
        check_vocabulary(len(self.processor.tokenizer), stock.config.text_config.vocab_size, f"filter.model {model}")
        self.model = BlipRetrieval.load_stock(stock)
        if self_check:
            from capfilt.modeling.selfcheck import check_filter

            self.check = check_filter(self, stock)
        del stock  # its tensors live on in self.model
        release_freed_memory()

    @property
    def identity(self) -> dict:
        return self.ref.identity

    def tokenize(self, texts: list[str]):
        return self.processor.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self.device, non_blocking=True)

    def image_embeds(self, images: list[np.ndarray]) -> torch.Tensor:
        """ViT embeddings (B, tokens, width) of decoded RGB images."""
        pixels = self.processor.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        return self.model.vision_model(pixels)

    def score(self, images: list[np.ndarray], texts: list[list[str]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(itm, itc) per image: arrays aligned with that image's texts (ITM computed for every text)."""
        scores = self.score_detailed(images, texts)
        return scores.itm, scores.itc

    @torch.inference_mode()
    def score_detailed(
        self, images: list[np.ndarray], texts: list[list[str]], cascade: CascadeConfig | None = None
    ) -> FilterScores:
        """ITC for every text; ITM for every text, or with ``cascade`` only inside its band."""
        owner = [i for i, ts in enumerate(texts) for _ in ts]
        flat = [t for ts in texts for t in ts]
        n = len(flat)
        itm = torch.zeros(n, device=self.device)
        itc = torch.zeros(n, device=self.device)
        computed = np.zeros(n, dtype=bool)
        if n:
            with inference_autocast(self.device, self.precision):
                image_embeds = self.image_embeds(images)
                image_feat = self.model.image_feat(image_embeds)
                for chunk, tokens in self._chunks(range(n), flat):
                    text_feat = self.model.text_feat(tokens.input_ids, tokens.attention_mask)
                    rows = self._index([owner[j] for j in chunk])
                    itc.index_copy_(0, self._index(chunk), (image_feat.index_select(0, rows) * text_feat).sum(-1))
                # With a cascade, choosing the band's texts is the one host sync of the call.
                computed = np.ones(n, dtype=bool) if cascade is None else cascade.needs_itm(itc.cpu().numpy())
                band = np.flatnonzero(computed).tolist()
                # Cross-attention K/V once per image, shared by every chunk of its texts; computed
                # for `kv_images` images at a time (42 MB per image at BLIP-base: a whole batch's
                # would be most of the stage's memory).
                for lo in range(0, len(images), self.kv_images):
                    group = [j for j in band if lo <= owner[j] < lo + self.kv_images]
                    if not group:
                        continue
                    embeds = image_embeds[lo : lo + self.kv_images]
                    images_kv = self.model.text_encoder.image_keys_values(embeds, list(range(len(embeds))))
                    for chunk, tokens in self._chunks(group, flat):
                        rows_kv = images_kv.for_rows([owner[j] - lo for j in chunk])
                        itm.index_copy_(
                            0, self._index(chunk), self.model.itm(tokens.input_ids, tokens.attention_mask, rows_kv)
                        )
                    del images_kv
        itm_np, itc_np = itm.cpu().numpy(), itc.cpu().numpy()
        bounds = np.cumsum([0] + [len(ts) for ts in texts])
        spans = list(zip(bounds[:-1], bounds[1:]))
        return FilterScores(
            [itm_np[a:b] for a, b in spans], [itc_np[a:b] for a, b in spans], [computed[a:b] for a, b in spans]
        )

    def _index(self, chunk: list[int]) -> torch.Tensor:
        return index_tensor(chunk, self.device)

    def _chunks(self, indices, texts: list[str]):
        """Length-sorted batches of text indices with their tokens: little compute spent on padding."""
        order = sorted(indices, key=lambda j: len(texts[j]))
        for start in range(0, len(order), self.text_batch_size):
            chunk = order[start : start + self.text_batch_size]
            yield chunk, self.tokenize([texts[j] for j in chunk])
