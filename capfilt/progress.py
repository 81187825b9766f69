"""The run's progress bar: all samples of the job, running totals, an ETA.

How many samples a job has is known only once its shards are read, so the bar's total is an
estimate — the mean size of the shards finished so far times the number of shards — shown with
a ``~`` until the last shard is done. Log records and Python warnings are printed above the bar
(tqdm's logging redirect), not into it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class Progress:
    """``advance(n)`` as batches are done; ``shard_done(stats)`` as shards are committed."""

    def __init__(self, shards: int, enabled: bool = True, file=None):
        enabled = enabled and shards > 0  # a rerun with every shard done: no empty "0/?" bar
        self.shards, self.done_shards = shards, 0
        self.done_samples = 0  # samples of the committed shards
        self.totals = {"kept": 0, "rejected": 0, "failed": 0}
        self.bar = tqdm(
            total=None,
            unit="img",
            desc="capfilt",
            disable=not enabled,
            dynamic_ncols=True,
            file=file,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} img "
            "[{elapsed}<{remaining}, {rate_fmt}]{postfix}",
        )
        self._postfix()

    def advance(self, samples: int) -> None:
        self.bar.update(samples)

    def shard_done(self, counts: dict) -> None:
        self.done_shards += 1
        self.done_samples += counts["input"]
        for k in self.totals:
            self.totals[k] += counts[k]
        mean = self.done_samples / self.done_shards
        self.bar.total = max(self.bar.n, round(mean * self.shards))
        self._postfix()

    def shard_failed(self) -> None:
        self.done_shards += 1
        self._postfix()

    def _postfix(self) -> None:
        exact = self.done_shards == self.shards
        self.bar.set_postfix_str(
            f"shards {self.done_shards}/{self.shards}, kept {self.totals['kept']}, "
            f"rejected {self.totals['rejected']}, failed {self.totals['failed']}"
            + ("" if exact or self.bar.total is None else " (total ~estimated)")
        )

    def close(self) -> None:
        self.bar.close()


@contextmanager
def progress_bar(shards: int, enabled: bool = True):
    """A `Progress`, with capfilt's log records and Python warnings printed above it."""
    bar = Progress(shards, enabled)
    if bar.bar.disable:
        try:
            yield bar
        finally:
            bar.close()
        return
    capture = not logging.getLogger("py.warnings").handlers
    logging.captureWarnings(True)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger()]):  # capfilt's records propagate to the root
            yield bar
    finally:
        bar.close()
        if capture:
            logging.captureWarnings(False)
