# Adapted from open_clip 3.3 src/open_clip/model.py (CLIP.encode_image, CLIP.encode_text)
"""The CLIP reranker: cosine similarity of an image and each of its candidate texts (open_clip).

Each image is encoded once for all of its texts (a naive rerank encodes it per candidate), and the
texts of a batch are cut to the batch's longest token sequence instead of the 77-token context:
CLIP's text tower is causal and pools at the end-of-text token, so positions after it never
change the result (tested against `encode_text`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from capfilt.modeling.loading import index_tensor, inference_autocast, pick_device, release_freed_memory
from capfilt.modeling.presets import resolve_clip


class ClipReranker:
    def __init__(
        self,
        model: str,
        *,
        pretrained: str | None = None,
        device: str = "auto",
        precision: str = "fp32",
        text_batch_size: int = 512,
        self_check: bool = True,
    ):
        """``self_check``: compare with open_clip's own encoders on a probe at load; refuse on disagreement."""
        import open_clip

        name, tag, self.identity = resolve_clip(model, pretrained)
        self.device = pick_device(device)
        self.precision = precision
        self.text_batch_size = text_batch_size
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        if self_check:
            from capfilt.modeling.selfcheck import check_clip

            self.check = check_clip(self)
        release_freed_memory()

    @torch.inference_mode()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(self.device)
        with inference_autocast(self.device, self.precision):
            return F.normalize(self.model.encode_image(batch).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)  # on the host: the trim length is read here, not from the device
        length = trimmed_length(tokens) if trimmable(self.model) else tokens.shape[1]
        with inference_autocast(self.device, self.precision):
            return F.normalize(
                encode_text_trimmed(self.model, tokens[:, :length].to(self.device, non_blocking=True), length).float(),
                dim=-1,
            )

    def score(self, images: list[np.ndarray], texts: list[list[str]]) -> list[np.ndarray]:
        """Cosine similarity per image, aligned with that image's texts."""
        return self.score_features(None, texts, images=images)[0]

    def score_features(
        self, image_feat: torch.Tensor | None, texts: list[list[str]], *, images=None, text_features: bool = False
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """`score` from image features already computed (`encode_images`; else from ``images``), and
        with ``text_features`` each image's texts' normalised features (rows aligned with its texts)."""
        flat = [(i, t) for i, ts in enumerate(texts) for t in ts]
        sims = np.zeros(len(flat), dtype=np.float32)
        feats = None
        if flat:
            image_feat = self.encode_images(images) if image_feat is None else image_feat.to(self.device)
            kept = torch.zeros(len(flat), image_feat.shape[1], device=self.device) if text_features else None
            # Length-sorted text batches: each is cut to its own longest text.
            order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
            out = torch.zeros(len(flat), device=self.device)
            for start in range(0, len(order), self.text_batch_size):
                chunk = order[start : start + self.text_batch_size]
                index = index_tensor(chunk, self.device)
                rows = index_tensor([flat[j][0] for j in chunk], self.device)
                text_feat = self.encode_texts([flat[j][1] for j in chunk])
                out.index_copy_(0, index, (image_feat.index_select(0, rows) * text_feat).sum(-1))
                if kept is not None:
                    kept.index_copy_(0, index, text_feat)
            sims = out.cpu().numpy()  # one device->host copy per call
            feats = kept.cpu().numpy() if kept is not None else None
        bounds = np.cumsum([0] + [len(ts) for ts in texts])
        spans = list(zip(bounds[:-1], bounds[1:]))
        return [sims[a:b] for a, b in spans], ([feats[a:b] for a, b in spans] if feats is not None else None)

    @property
    def embed_dim(self) -> int:
        """The width of this model's image (and text) embeddings."""
        return int(self.model.visual.output_dim)


def trimmable(model) -> bool:
    """A causal text tower pooled at the end-of-text token: later positions never change it."""
    import open_clip

    return isinstance(model, open_clip.CLIP) and model.text_pool_type == "argmax" and model.attn_mask is not None


def trimmed_length(tokens: torch.Tensor) -> int:
    """Positions up to the batch's last end-of-text token (which has the highest id in CLIP's BPE)."""
    return int(tokens.argmax(dim=-1).max()) + 1


def encode_text_trimmed(model, tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """`model.encode_text` over only the first L positions, L = the batch's longest text.

    Pass ``length`` (from `trimmed_length` on host tokens) to avoid reading it from the device.
    """
    if not trimmable(model):
        return model.encode_text(tokens)
    length = trimmed_length(tokens) if length is None else length
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x
