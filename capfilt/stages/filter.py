"""The filter stage (config section ``filter``): BLIP's image-text matching head scores every
candidate text (``itm``, a probability) and its contrastive head (``itc``, a cosine)."""

from __future__ import annotations

from capfilt.stages.isolate import isolating, spread
from capfilt.stages.rows import scorable


class Filter:
    """Adds `itm` and `itc`: per-candidate lists (None for candidates rejected before scoring)."""

    section = "filter"  # its config section

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        self.filter, self.cascade = None, None
        if config is not None:
            from capfilt.modeling.itm_filter import ItmFilter

            self.filter = ItmFilter(
                config.model,
                revision=config.revision,
                device=device,
                precision=precision,
                max_text_tokens=config.max_text_tokens,
                self_check=self_check,
            )
            self.cascade = config.cascade  # its ITC band; None: ITM for every text

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        if self.filter is None:
            return {**batch, "itm": [None] * n, "itc": [None] * n}
        failures, details = list(batch["failure"]), list(batch["detail"])
        rows, index, texts = scorable(batch)
        images = [batch["image"][i] for i in rows]

        def run(imgs, txts):
            scores = self.filter.score_detailed(imgs, txts, self.cascade)
            return list(zip(scores.itm_or_none(), scores.itc))

        pairs = isolating(run, rows, [images, texts], failures, details)
        itm = spread(batch, rows, index, [p[0] if p else None for p in pairs], "itm", failures)
        itc = spread(batch, rows, index, [p[1] if p else None for p in pairs], "itc", failures)
        return {**batch, "itm": itm, "itc": itc, "failure": failures, "detail": details}
