"""Pipeline stages: callable classes over a batch (a dict of equal-length column lists).

One name per stage, from its file to its config section:

    stage     file                config section   adds columns
    Decode    stages/decode.py    decode           image
    Caption   stages/caption.py   captioner        captions
    Filter    stages/filter.py    filter           itm, itc
    Clip      stages/clip.py      clip             clip (+ image_embedding, clip.K.embeddings)
    Claims    stages/claims.py    claims           claims, claim_scores (with Filter/Clip model)
    Quality   stages/quality.py   quality          aesthetic, punsafe (heads on the embeddings)
    Watermark stages/watermark.py watermark        pwatermark
    Decide    stages/decide.py    decide           kept, reasons, selected, status
    Edit      stages/edit.py      edit             edited (the selected caption rewritten)

Each class carries its ``section``. Each `__init__` loads what it needs once; each
`__call__(batch) -> batch` adds columns. Both runners build the stages with `build_stages` and run
them with `run_stages` in a shard worker (runners/worker.py), which holds every configured model: the
local runner in this process, the Ray runner one per Ray actor.
"""

from __future__ import annotations

import time

from capfilt.config import MODEL_SECTIONS
from capfilt.stages.caption import Caption
from capfilt.stages.claims import Claims
from capfilt.stages.clip import Clip
from capfilt.stages.decide import Decide
from capfilt.stages.decode import Decode
from capfilt.stages.edit import Edit
from capfilt.stages.filter import Filter
from capfilt.stages.quality import Quality
from capfilt.stages.watermark import Watermark

__all__ = [
    "Decode",
    "Caption",
    "Filter",
    "Clip",
    "Claims",
    "Quality",
    "Watermark",
    "Decide",
    "Edit",
    "STAGES",
    "MODEL_STAGES",
    "StageError",
    "build_stages",
    "run_stages",
]

STAGES = (Decode, Caption, Filter, Clip, Claims, Quality, Watermark, Decide, Edit)  # in the order they run
# The ones that load a model (once per shard worker): those of config.MODEL_SECTIONS.
MODEL_STAGES = tuple(stage for stage in STAGES if stage.section in MODEL_SECTIONS)


def build_stages(config, only: tuple[type, ...] = STAGES) -> list:
    """The stage objects in order (those of ``only``); model stages load their model here, once
    (none for a section the config leaves unset: that stage passes its batch through)."""
    kw = {"device": config.device, "precision": config.precision, "self_check": config.self_check}
    make = {
        Decode: lambda: Decode(config.decode.min_side, config.decode.max_pixels, config.decode.max_side),
        Caption: lambda: Caption(config.captioner, **kw),
        Filter: lambda: Filter(config.filter, **kw),
        Clip: lambda: Clip(config.clip, **kw),
        Quality: lambda: Quality(config.quality, config.clip, device=config.device),
        Watermark: lambda: Watermark(config.watermark, **kw),
        # Claims scores with the model the Filter / Clip stage built here loaded (no second copy).
        Claims: lambda: Claims(config.claims, _claim_scorer(config.claims, built)),
        Decide: lambda: Decide(config.decide, config.filter.cascade if config.filter else None, config.claims),
        Edit: lambda: Edit(config.edit, **kw),
    }
    built: dict = {}
    for stage in STAGES:
        if stage in only:
            built[stage] = make[stage]()
    return list(built.values())


def _claim_scorer(claims, built: dict):
    """The loaded model the claims section scores with: the Filter stage's ItmFilter, or the Clip
    stage's last chain model; None when that stage is not built in this process."""
    if claims is None:
        return None
    if claims.score == "clip":
        return built[Clip].clip if Clip in built else None
    return built[Filter].filter if Filter in built else None


class StageError(Exception):
    """A stage raised `error` on a batch; `stage` names it (the stage's class name)."""

    def __init__(self, stage: str, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.stage, self.error = stage, error


def run_stages(stages: list, batch: dict, seconds: dict) -> dict:
    """Run `stages` over `batch` in order, adding each stage's time to `seconds[class name]`.

    What a stage raises comes out as a `StageError` (from the original): a runner fails the
    batch's shard with `str(err)`, "{type}: {message}" of what the stage raised.
    """
    for stage in stages:
        name = type(stage).__name__
        start = time.perf_counter()
        try:
            batch = stage(batch)
        except Exception as err:
            raise StageError(name, err) from err
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return batch
