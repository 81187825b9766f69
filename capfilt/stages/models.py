"""Model stages: caption (BLIP decoder), score (BLIP ITM/ITC), rerank (CLIP).

A batch a model raises on is retried one sample at a time, so one poisonous sample fails alone
(reason model_error) instead of taking its batch or the job down.
"""

from __future__ import annotations

import logging

from capfilt.records import Reason
from capfilt.stages.rows import scorable

log = logging.getLogger(__name__)


def _isolating(fn, rows: list[int], args: list[list], failures: list[str], details: list[str]) -> list:
    """fn(*column_lists) over all rows; on error retried per row. Returns per-row results (None if failed)."""
    try:
        return list(fn(*args))
    except Exception as err:  # noqa: BLE001 - any model error is isolated to its sample below
        log.warning("model batch of %d failed (%s); retrying one sample at a time", len(rows), err)
    results = []
    for n, row in enumerate(rows):
        try:
            results.append(fn(*[[a[n]] for a in args])[0])
        except Exception as err:  # noqa: BLE001
            failures[row], details[row] = Reason.MODEL_ERROR, f"{type(err).__name__}: {err}"[:500]
            results.append(None)
    return results


class Caption:
    """Adds `captions`: K synthetic captions per live row ([] when disabled or failed)."""

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        self.captioner = None
        if config is not None:
            from capfilt.modeling.captioner import Captioner, Decoding

            fields = {k: v for k, v in config.model_dump().items() if k in Decoding.__dataclass_fields__}
            self.captioner = Captioner(config.model, revision=config.revision, device=device,
                                       precision=precision, decoding=Decoding(**fields), self_check=self_check)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        captions = [[] for _ in range(n)]
        failures, details = list(batch["failure"]), list(batch["detail"])
        live = [i for i in range(n) if not failures[i]]
        if self.captioner is not None and live:
            images = [batch["image"][i] for i in live]
            seeds = [int(batch["seed"][i]) for i in live]
            for i, caps in zip(live, _isolating(self.captioner.caption, live, [images, seeds], failures, details)):
                captions[i] = caps if caps is not None else []
        return {**batch, "captions": captions, "failure": failures, "detail": details}


def _spread(batch: dict, rows, index, per_row_scores, name: str, failures) -> list:
    """Per-row score lists aligned with all candidates (None where not scored)."""
    out = [None] * len(batch["key"])
    for i, idx, scores in zip(rows, index, per_row_scores):
        if failures[i] or scores is None:
            continue
        n_cands = 1 + len(batch["captions"][i])
        full = [None] * n_cands
        for j, s in zip(idx, scores):
            full[j] = None if s is None else float(s)
        out[i] = full
    return out


def cascade_of(filter_config):
    """The modeling-side `Cascade` for a run's filter config (None: ITM for every text)."""
    if filter_config is None or filter_config.cascade is None:
        return None
    from capfilt.modeling.itm_filter import Cascade

    return Cascade(lo=filter_config.cascade.itc_low, hi=filter_config.cascade.itc_high)


class Score:
    """Adds `itm` and `itc`: per-candidate lists (None for candidates rejected before scoring)."""

    def __init__(self, config=None, *, device: str = "auto", precision: str = "fp32", self_check: bool = True):
        self.filter, self.cascade = None, None
        if config is not None:
            from capfilt.modeling.itm_filter import ItmFilter

            self.filter = ItmFilter(config.model, revision=config.revision, device=device, precision=precision,
                                    max_text_tokens=config.max_text_tokens, self_check=self_check)
            self.cascade = cascade_of(config)

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

        pairs = _isolating(run, rows, [images, texts], failures, details)
        itm = _spread(batch, rows, index, [p[0] if p else None for p in pairs], "itm", failures)
        itc = _spread(batch, rows, index, [p[1] if p else None for p in pairs], "itc", failures)
        return {**batch, "itm": itm, "itc": itc, "failure": failures, "detail": details}


class Rerank:
    """Adds `clip`: per-candidate CLIP cosine lists."""

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
        sims = _isolating(self.clip.score, rows, [images, texts], failures, details)
        return {**batch, "clip": _spread(batch, rows, index, sims, "clip", failures),
                "failure": failures, "detail": details}
