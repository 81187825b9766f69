"""The clip stage (config section ``clip``): an open_clip model's cosine between each image and
every candidate text (``clip``), to rerank and threshold them."""

from __future__ import annotations

from capfilt.stages.isolate import isolating, spread
from capfilt.stages.rows import scorable


class Clip:
    """Adds `clip`: per-candidate CLIP cosine lists."""

    section = "clip"  # its config section, and its Ray pool's ``ray.clip_actors``

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        self.clip = None
        if config is not None:
            from capfilt.modeling.clip_reranker import ClipReranker

            self.clip = ClipReranker(config.model, pretrained=config.pretrained, device=device, precision=precision,
                                     self_check=self_check)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        if self.clip is None:
            return {**batch, "clip": [None] * n}
        failures, details = list(batch["failure"]), list(batch["detail"])
        rows, index, texts = scorable(batch)
        images = [batch["image"][i] for i in rows]
        sims = isolating(self.clip.score, rows, [images, texts], failures, details)
        return {**batch, "clip": spread(batch, rows, index, sims, "clip", failures),
                "failure": failures, "detail": details}
