"""The watermark stage (config section ``watermark``): LAION's watermark detector (a timm image
classifier, `modeling.heads.WatermarkDetector`) on each decoded image; adds ``pwatermark`` (the
probability of its "watermark" class; None where not computed). A model stage of its own: it
reads pixels, not the clip chain's embeddings. With ``watermark.prefer: input`` a sample whose
input already has pwatermark (a LAION sidecar) keeps that value.
"""

from __future__ import annotations

from capfilt.stages.isolate import isolating
from capfilt.stages.quality import image_score


class Watermark:
    """Adds `pwatermark` per sample."""

    section = "watermark"  # its config section

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        self.model, self.config = None, config
        if config is not None:
            from capfilt.modeling.heads import Head

            self.model = Head(
                config.model, "watermark.model", revision=config.revision, device=device, kind="laion_watermark"
            )

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        if self.model is None:
            return {**batch, "pwatermark": [None] * n}
        failures, details = list(batch["failure"]), list(batch["detail"])
        metas = batch.get("laion_meta") or [None] * n
        prefer = self.config.prefer
        # a sample whose input value wins is not run through the model
        todo = [i for i in range(n) if not failures[i] and image_score(None, metas[i], "pwatermark", prefer) is None]
        size = self.config.batch_size or max(1, len(todo))
        values = [None] * n
        for start in range(0, len(todo), size):
            rows = todo[start : start + size]
            scores = isolating(self.model.score_images, rows, [[batch["image"][i] for i in rows]], failures, details)
            for i, s in zip(rows, scores):
                values[i] = None if s is None else float(s)
        pwatermark = [None if failures[i] else image_score(values[i], metas[i], "pwatermark", prefer) for i in range(n)]
        return {**batch, "pwatermark": pwatermark, "failure": failures, "detail": details}
