"""The filter: ITM match probability and ITC cosine from a `BlipForImageTextRetrieval`.

Stock `forward` takes one (image, text) pair per row and re-runs the ViT for each. Here each image
is encoded once, its cross-attention K/V are computed once and shared by all of its texts, and the
texts are batched by length; the scores are those of the stock per-pair forward (tested).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, BlipForImageTextRetrieval

from capfilt.modeling.blip_kv import image_placeholder, shared_cross_attention
from capfilt.modeling.loading import autocast, from_pretrained, pick_device
from capfilt.modeling.presets import resolve_blip


class ItmFilter:
    def __init__(self, model: str, *, revision: str | None = None, device: str = "auto", precision: str = "fp32",
                 max_text_tokens: int = 35, text_batch_size: int = 256):
        self.ref = resolve_blip(model, "filter", revision)
        self.device = pick_device(device)
        self.precision = precision
        self.max_text_tokens = max_text_tokens  # BLIP truncates filter input to 35 tokens
        self.text_batch_size = text_batch_size
        self.model = from_pretrained(BlipForImageTextRetrieval, self.ref.location, revision).to(self.device)
        self.processor = AutoProcessor.from_pretrained(self.ref.location, revision=revision)

    @property
    def identity(self) -> dict:
        return self.ref.identity

    def tokenize(self, texts: list[str]):
        return self.processor.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(self.device)

    @torch.inference_mode()
    def score(self, images: list[np.ndarray], texts: list[list[str]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(itm, itc) per image: arrays aligned with that image's texts."""
        flat = [(i, t) for i, ts in enumerate(texts) for t in ts]
        itm = np.zeros(len(flat), dtype=np.float32)
        itc = np.zeros(len(flat), dtype=np.float32)
        if flat:
            pixels = self.processor.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
            with autocast(self.device, self.precision):
                image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
                image_feat = F.normalize(self.model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
                # Length-sorted text batches waste little compute on padding.
                order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
                for start in range(0, len(order), self.text_batch_size):
                    chunk = order[start:start + self.text_batch_size]
                    rows = torch.tensor([flat[j][0] for j in chunk], device=self.device)
                    m, c = self._score_chunk(image_embeds, image_feat, rows, [flat[j][1] for j in chunk])
                    itm[chunk], itc[chunk] = m, c
        bounds = np.cumsum([0] + [len(ts) for ts in texts])
        return ([itm[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                [itc[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

    def _score_chunk(self, image_embeds, image_feat, rows, texts):
        tokens = self.tokenize(texts)
        encoder = self.model.text_encoder
        cache = shared_cross_attention(encoder, image_embeds, rows)
        grounded = encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_placeholder(image_embeds, len(rows)), past_key_values=cache,
        ).last_hidden_state
        itm = self.model.itm_head(grounded[:, 0, :]).float().softmax(dim=-1)[:, 1]
        unimodal = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        text_feat = F.normalize(self.model.text_proj(unimodal[:, 0, :]).float(), dim=-1)
        itc = (image_feat.index_select(0, rows) * text_feat).sum(dim=-1)
        return itm.cpu().numpy(), itc.cpu().numpy()
