"""What the three model stages (caption, filter, clip) share: failure isolation and the
alignment of per-text scores with a row's candidates.

A batch a model raises on is retried one sample at a time, so one poisonous sample fails alone
(reason model_error) instead of taking its batch or the job down.
"""

from __future__ import annotations

import logging

from capfilt.records import Reason

log = logging.getLogger(__name__)


def isolating(fn, rows: list[int], args: list[list], failures: list[str], details: list[str]) -> list:
    """fn(*column_lists) over all rows; on error retried per row. Returns per-row results (None if failed)."""
    try:
        return list(fn(*args))
    except Exception as err:  # noqa: BLE001 - any model error is isolated to its sample below
        log.warning("model batch of %d failed (%s); retrying one sample at a time", len(rows), err)
    results = []
    for n, row in enumerate(rows):
        try:
            results.append(fn(*[[a[n]] for a in args])[0])
        except Exception as err:  # noqa: BLE001 - this sample fails alone with its reason; the batch goes on
            failures[row], details[row] = Reason.MODEL_ERROR, f"{type(err).__name__}: {err}"[:500]
            results.append(None)
    return results


def spread(batch: dict, rows, index, per_row_scores, name: str, failures) -> list:
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
