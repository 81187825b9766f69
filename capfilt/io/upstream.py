"""What img2dataset attempted for a shard but did not write into its tar.

img2dataset writes, next to each ``{shard}.tar``:

* ``{shard}.parquet``: one row per *attempted* sample, written ones and failed ones alike, with the
  input columns (``url``, ``caption``, ...) plus ``key``, ``status`` (``success``,
  ``failed_to_download``, ``failed_to_resize``) and ``error_message`` (the exception text, or
  ``hash mismatch``);
* ``{shard}_stats.json``: ``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``,
  ``duration``, ``status_dict`` ({error message or "success": count}).

Samples that failed upstream never reach capfilt's input, so they are not part of
``input = kept + rejected + failed``; they are reported beside it (``upstream_failed``), so that
``input + upstream_failed`` is what img2dataset attempted. Everything here is best effort: a
missing or unreadable file, or one without the columns we need, means "no upstream counts", never
a failed shard.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable

import fsspec
import pyarrow.parquet as pq

from capfilt.io.shards import shard_id, sidecar_url

log = logging.getLogger(__name__)

SUCCESS = "success"
# A sidecar row with status "success" whose key has no member in the tar (lost between img2dataset
# and here): counted beside the other upstream failures under this status, so that every sidecar row
# is in exactly one count.
MISSING_FROM_TAR = "missing_from_tar"
MISSING_REASON = "status success, but the tar holds no member of this key"
MAX_REASON_CHARS = 100
_STATUSES = ("failed_to_download", "failed_to_resize")


def empty_upstream() -> dict:
    return {"upstream_failed": 0, "upstream_failed_by_reason": {}, "upstream_failed_by_status": {}}


def stats_url(url: str) -> str:
    """Where img2dataset puts a shard's stats: ``{dir}/{shard}_stats.json``."""
    head, sep, _ = url.rpartition("/")
    return f"{head}{sep}{shard_id(url)}_stats.json"


def reason_of(message, status) -> str:
    """The img2dataset error message (what its status_dict counts), cut to MAX_REASON_CHARS;
    the status when there is no message."""
    text = " ".join(str(message).split()) if message not in (None, "") else str(status or "unknown")
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _open(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        return None
    return fs.open(path, "rb")


def _from_sidecar(url: str, input_keys: set[str] | None) -> dict | None:
    side = sidecar_url(url)
    f = _open(side)
    if f is None:
        return None
    with f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if "status" not in names:
            return None  # a sidecar, but not one that says what failed
        columns = [c for c in ("key", "status", "error_message") if c in names]
        table = parquet.read(columns=columns)
    keys = table.column("key").to_pylist() if "key" in columns else [None] * table.num_rows
    statuses = table.column("status").to_pylist()
    messages = table.column("error_message").to_pylist() if "error_message" in columns else [None] * table.num_rows
    by_reason, by_status = Counter(), Counter()
    for key, status, message in zip(keys, statuses, messages):
        # A null status says nothing; a key the tar holds was input to capfilt, whatever the row says.
        if status is None or (key is not None and input_keys is not None and str(key) in input_keys):
            continue
        if status == SUCCESS:
            if key is None or input_keys is None:
                continue  # written, says the row, and no tar's keys to look it up in
            status, message = MISSING_FROM_TAR, MISSING_REASON
        by_status[str(status)] += 1
        by_reason[reason_of(message, status)] += 1
    return _counts(by_reason, by_status)


def _from_stats(url: str, input_keys: set[str] | None) -> dict | None:
    f = _open(stats_url(url))
    if f is None:
        return None
    with f:
        stats = json.load(f)
    if not isinstance(stats, dict):
        return None
    by_status = Counter({s: int(stats[s]) for s in _STATUSES if isinstance(stats.get(s), int) and stats[s] > 0})
    if not by_status:
        count, successes = stats.get("count"), stats.get("successes")
        if isinstance(count, int) and isinstance(successes, int) and count > successes:
            by_status["failed"] = count - successes
    by_reason = Counter()
    status_dict = stats.get("status_dict")
    if isinstance(status_dict, dict):
        for message, n in status_dict.items():
            if message != SUCCESS and isinstance(n, int) and n > 0:
                by_reason[reason_of(message, None)] += n
    if sum(by_reason.values()) != sum(by_status.values()):
        by_reason = Counter(by_status)  # messages do not add up (capped counter, ...): by status only
    successes = stats.get("successes")
    if isinstance(successes, int) and input_keys is not None and successes > len(input_keys):
        by_status[MISSING_FROM_TAR] = successes - len(input_keys)  # written upstream, not in the tar
        by_reason[MISSING_REASON] = successes - len(input_keys)
    return _counts(by_reason, by_status)


def _counts(by_reason: Counter, by_status: Counter) -> dict:
    return {
        "upstream_failed": sum(by_status.values()),
        "upstream_failed_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "upstream_failed_by_status": dict(sorted(by_status.items())),
    }


def read_upstream(url: str | None, input_keys: Iterable[str] | None = None) -> dict:
    """Upstream failure counts of the shard at ``url`` (a path or an fsspec URL).

    From the parquet sidecar when it has a ``status`` column: rows whose key is not among
    ``input_keys`` (the keys capfilt read from the tar; None: not known), by their status; a
    ``success`` row among them as ``missing_from_tar`` (when the keys are known). Otherwise from
    ``{shard}_stats.json`` (successes beyond the number of keys read: ``missing_from_tar``).
    Otherwise, or when the files cannot be read, zero.
    """
    if not url:
        return empty_upstream()
    keys = None if input_keys is None else {str(k) for k in input_keys}
    for reader, name in (
        (lambda: _from_sidecar(url, keys), sidecar_url(url)),
        (lambda: _from_stats(url, keys), stats_url(url)),
    ):
        try:
            counts = reader()
        except Exception as e:  # noqa: BLE001 - upstream counts are metadata: never fail a shard over them
            log.warning("ignoring unreadable img2dataset file %s: %s", name, e)
            continue
        if counts is not None:
            return counts
    return empty_upstream()
