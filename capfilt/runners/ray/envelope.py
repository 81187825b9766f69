"""The Ray row: one batch of the local runner, packed as an *envelope* (no Ray in here).

An envelope is ``(shard, part)`` plus the stages' column dict, pickled, so Ray Data moves it as
one opaque row (the package docstring says why whole batches). ``parts`` is set on a shard's last
envelope only; an empty shard sends one empty envelope, an unreadable one an envelope with its
error. The last operator stores each decided batch as its part file (`PartSink`) and sends on
the envelope without payload: what reaches the driver is a few hundred bytes per batch.
"""

from __future__ import annotations

import json
import logging
import pickle
import time

import pyarrow as pa

from capfilt.io.parts import write_part
from capfilt.io.shard_writer import render
from capfilt.stages import StageError, run_stages

log = logging.getLogger("capfilt")

ENVELOPE = pa.schema(
    [
        ("shard", pa.string()),
        ("part", pa.int64()),
        ("parts", pa.int64()),
        ("rows", pa.int64()),
        ("error", pa.string()),
        ("seconds", pa.string()),  # JSON {stage: seconds spent on this batch}
        ("payload", pa.large_binary()),  # pickled column dict, exactly what the stages return
        ("stored", pa.int64()),  # bytes of the batch's part file, once the last operator stored it
    ]
)


def pack(batch: dict) -> bytes:
    return pickle.dumps(batch, protocol=5)


def unpack(payload: bytes) -> dict:
    return pickle.loads(payload)


def envelope(shard: str, part: int, last: bool, batch: dict | None, error: str = "", seconds=None) -> dict:
    rows = len(batch["key"]) if batch else 0
    return {
        "shard": shard,
        "part": part,
        "parts": part + 1 if last else -1,
        "rows": rows,
        "error": error,
        "seconds": json.dumps(seconds or {}),
        "payload": pack(batch) if batch else b"",
        "stored": 0,
    }


class PartSink:
    """The last operator's output: a decided batch rendered into its share of the shard's
    outputs and stored as its part file in the output location (io/parts.py)."""

    def __init__(self, out: str, laion: bool):
        self.out, self.laion = out, laion

    def __call__(self, shard: str, part: int, batch: dict, seconds: dict) -> int:
        start = time.perf_counter()
        stored = write_part(self.out, shard, part, render(batch, self.laion))
        seconds["Write"] = seconds.get("Write", 0.0) + time.perf_counter() - start
        return stored


def to_table(envelopes: list[dict]) -> pa.Table:
    """Envelopes as the pyarrow table Ray Data's batches are made of."""
    return pa.Table.from_pylist(envelopes, schema=ENVELOPE)


def apply_stages(stages: list, table: pa.Table, sink: PartSink | None = None) -> pa.Table:
    """Run stages over every envelope of a Ray batch (a pyarrow table of envelopes).

    Envelopes of failed or empty shards pass through untouched. An exception a stage raises
    fails the envelope's shard, exactly as it fails the shard in the local runner. With a
    ``sink`` (the last operator, ending with Decide), each decided batch is stored as its part
    file and dropped here, decoded pixels and all; the envelope goes on without payload.
    """
    out = []
    for env in table.to_pylist():
        if env["error"] or not env["rows"]:
            out.append(env)
            continue
        seconds = json.loads(env["seconds"])
        try:
            batch = run_stages(stages, unpack(env["payload"]), seconds)
            stored = sink(env["shard"], env["part"], batch, seconds) if sink else 0
        except StageError as err:
            log.error("shard %s failed in %s: %s", env["shard"], err.stage, err)
            out.append({**env, "error": str(err), "payload": b""})
            continue
        except Exception as err:  # noqa: BLE001 - storing the part failed: as a write error in the local runner
            log.error("shard %s failed writing part %d: %s: %s", env["shard"], env["part"], type(err).__name__, err)
            out.append({**env, "error": f"{type(err).__name__}: {err}", "payload": b""})
            continue
        payload = b"" if sink else pack(batch)
        out.append({**env, "payload": payload, "seconds": json.dumps(seconds), "stored": stored})
    return to_table(out)
