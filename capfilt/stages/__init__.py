"""Pipeline stages: callable classes over a batch (a dict of equal-length column lists).

decode -> caption -> score (ITM/ITC) -> rerank (CLIP) -> decide. Each `__init__` loads what it
needs once; each `__call__(batch) -> batch` adds columns. Both runners build the stages with
`build_stages` and run them with `run_stages`: the local runner in this process, the Ray runner
in Ray Data tasks and actors.
"""

from __future__ import annotations

import time

from capfilt.stages.decide import Decide
from capfilt.stages.decode import Decode
from capfilt.stages.models import Caption, Rerank, Score

__all__ = ["Decode", "Caption", "Score", "Rerank", "Decide", "StageError", "build_stages", "run_stages"]


def build_stages(config) -> list:
    """The stage objects in order; model stages load their model here, once (none for a section
    the config leaves unset: that stage passes its batch through)."""
    kw = {"device": config.device, "precision": config.precision, "self_check": config.self_check}
    return [
        Decode(config.decode.min_side, config.decode.max_pixels, config.decode.max_side),
        Caption(config.captioner, **kw),
        Score(config.filter, **kw),
        Rerank(config.clip, **kw),
        Decide(config.decide, config.filter.cascade if config.filter else None),
    ]


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
        except Exception as err:  # noqa: BLE001 - the runner decides: the shard fails, the job goes on
            raise StageError(name, err) from err
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return batch
