"""The driver's side of the Ray runner: envelope metadata in, one commit per shard (no Ray in here).

By the time an envelope reaches the driver its batch is already stored as a part file in the
output location (envelope.PartSink); the envelope carries only its address, row count, timings
and size. The driver keeps ``part -> rows`` per shard, and when it holds ``parts`` distinct
parts it hands the shard to ``commit(shard, parts)`` — under Ray a task that runs
`commit_shard` on a worker — exactly once. A re-delivered envelope (a task Ray retried, a block
it rebuilt from lineage) stands for an identical part file, because the stages are
deterministic, so it is dropped. See the package docstring for the whole exactly-once argument.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict

from capfilt.io.parts import commit_parts

log = logging.getLogger("capfilt")


def commit_shard(
    out: str, shard: str, parts: list[int], laion: bool, source: str | None, owner: str | None = None
) -> dict:
    """Commit one shard from its part files (on a worker); returns only its counts and time.
    ``owner``: the lock token of the driver's run (io/parts.py `commit_parts`)."""
    start = time.perf_counter()
    stats = commit_parts(out, shard, parts, laion=laion, source=source, owner=owner)
    return {**{k: stats[k] for k in ("input", "kept", "rejected", "failed")}, "seconds": time.perf_counter() - start}


class ShardAssembler:
    """Tracks the parts of every shard from envelope metadata; commits each shard once."""

    def __init__(self, total: int, commit, progress=None):
        self.total, self.commit = total, commit  # commit(shard, parts with samples), returns at once
        self.progress = progress  # a capfilt.progress.Progress, or None
        self.parts: dict[str, dict[int, int]] = {}  # shard -> part -> rows
        self.expected: dict[str, int] = {}
        self.committing: set[str] = set()
        self.finished: set[str] = set()
        self.errors: dict[str, str] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.duplicates = 0
        self.samples = 0
        self.stored = 0  # bytes of part files the workers stored
        self.start = time.perf_counter()

    def add(self, env: dict) -> None:
        shard, part = env["shard"], env["part"]
        if shard in self.errors:  # the rest of a failed shard
            return
        if shard in self.finished or shard in self.committing or part in self.parts.get(shard, ()):
            # A re-delivery (task retry, lineage reconstruction): its part file is identical to the
            # one stored, because the stages are deterministic. Dropping it keeps exactly-once.
            self.duplicates += 1
            log.debug("dropping re-delivered part %d of shard %s", part, shard)
            return
        if env["error"]:
            self._fail(shard, env["error"])
            return
        if env["payload"]:
            raise RuntimeError("an envelope with its batch reached the driver: the last operator must store it")
        self.parts.setdefault(shard, {})[part] = env["rows"]
        if self.progress:
            self.progress.advance(env["rows"])
        self.stored += env["stored"]
        for stage, s in json.loads(env["seconds"]).items():
            self.seconds[stage] += s
        if env["parts"] >= 0:
            self.expected[shard] = env["parts"]
        if len(self.parts[shard]) == self.expected.get(shard, -1):
            parts = self.parts.pop(shard)
            self.expected.pop(shard)
            self.committing.add(shard)
            self.commit(shard, [p for p in sorted(parts) if parts[p]])

    def committed(self, shard: str, counts: dict) -> None:
        """The commit task of ``shard`` returned: its marker is written."""
        self.committing.discard(shard)
        self.finished.add(shard)
        self.seconds["Write"] += counts["seconds"]
        self.samples += counts["input"]
        if self.progress:
            self.progress.shard_done(counts)
        elapsed = time.perf_counter() - self.start
        log.info(
            "shard %s committed: %d samples (kept %d, rejected %d, failed %d) | %d/%d shards, %.1f samples/s",
            shard,
            counts["input"],
            counts["kept"],
            counts["rejected"],
            counts["failed"],
            len(self.finished),
            self.total,
            self.samples / max(elapsed, 1e-9),
        )

    def commit_failed(self, shard: str, error: str) -> None:
        """The commit task of ``shard`` raised (as a write error fails a shard in the local runner)."""
        self.committing.discard(shard)
        self._fail(shard, error)

    def _fail(self, shard: str, error: str, quiet: bool = False) -> None:
        self.errors[shard] = error
        self.finished.add(shard)
        if self.progress:
            self.progress.shard_failed()
        self.parts.pop(shard, None)
        self.expected.pop(shard, None)
        if not quiet:
            log.error("shard %s failed: %s", shard, error)

    def abort(self, shards: list[str], error: str) -> None:
        """The Ray job stopped: every shard not yet committed is reported (committed ones stay)."""
        left = [s for s in shards if s not in self.finished and s not in self.committing]
        for shard in left:
            self._fail(shard, error, quiet=True)
        log.error("%d shards not committed; run the same command again to resume them", len(left))

    def finish(self, shards: list[str]) -> None:
        """Any shard that did not arrive whole is an error, never a silent loss."""
        for shard in shards:
            if shard in self.finished:
                continue
            got, want = len(self.parts.get(shard, {})), self.expected.get(shard)
            self._fail(shard, f"incomplete: {got} of {want if want is not None else '?'} parts arrived from Ray")
