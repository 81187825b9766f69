"""The Ray row: one batch of the local runner, packed as an *envelope* (no Ray in here).

An envelope is ``(shard, part)`` plus the stages' column dict, pickled, so Ray Data moves it as
one opaque row (the package docstring says why whole batches). ``parts`` is set on a shard's last
envelope only; an empty shard sends one empty envelope, an unreadable one an envelope with its
error.
"""

from __future__ import annotations

import json
import logging
import pickle

import pyarrow as pa

from capfilt.stages import Decide, StageError, run_stages

log = logging.getLogger("capfilt")

ENVELOPE = pa.schema([
    ("shard", pa.string()),
    ("part", pa.int64()),
    ("parts", pa.int64()),
    ("rows", pa.int64()),
    ("error", pa.string()),
    ("seconds", pa.string()),  # JSON {stage: seconds spent on this batch}
    ("payload", pa.large_binary()),  # pickled column dict, exactly what the stages return
])


def pack(batch: dict) -> bytes:
    return pickle.dumps(batch, protocol=5)


def unpack(payload: bytes) -> dict:
    return pickle.loads(payload)


def envelope(shard: str, part: int, last: bool, batch: dict | None, error: str = "", seconds=None) -> dict:
    rows = len(batch["key"]) if batch else 0
    return {"shard": shard, "part": part, "parts": part + 1 if last else -1, "rows": rows, "error": error,
            "seconds": json.dumps(seconds or {}), "payload": pack(batch) if batch else b""}


def to_table(envelopes: list[dict]) -> pa.Table:
    """Envelopes as the pyarrow table Ray Data's batches are made of."""
    return pa.Table.from_pylist(envelopes, schema=ENVELOPE)


def apply_stages(stages: list, table: pa.Table) -> pa.Table:
    """Run stages over every envelope of a Ray batch (a pyarrow table of envelopes).

    Envelopes of failed or empty shards pass through untouched. An exception a stage raises
    fails the envelope's shard, exactly as it fails the shard in the local runner. After Decide
    the decoded pixels are dropped: the driver needs only what write_shard writes.
    """
    out = []
    for env in table.to_pylist():
        if env["error"] or not env["rows"]:
            out.append(env)
            continue
        seconds = json.loads(env["seconds"])
        try:
            batch = run_stages(stages, unpack(env["payload"]), seconds)
        except StageError as err:
            log.error("shard %s failed in %s: %s", env["shard"], err.stage, err)
            out.append({**env, "error": str(err), "payload": b""})
            continue
        if any(isinstance(stage, Decide) for stage in stages):
            batch.pop("image", None)
        out.append({**env, "payload": pack(batch), "seconds": json.dumps(seconds)})
    return to_table(out)
