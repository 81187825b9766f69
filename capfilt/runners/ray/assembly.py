"""The driver's side of the Ray runner: envelopes in, each shard committed once (no Ray in here).

The driver keeps ``part -> envelope`` per shard and commits the shard with ``write_shard`` when it
holds ``parts`` distinct parts. A re-delivered envelope (a task Ray retried, a block it rebuilt
from lineage) is identical to the one held or committed, because the stages are deterministic,
so it is dropped: no sample is written twice, no shard committed twice. See the package
docstring for the whole exactly-once argument.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict

from capfilt.io.output import write_shard
from capfilt.runners.ray.envelope import unpack

log = logging.getLogger("capfilt")


class ShardAssembler:
    """Collects envelopes per shard; commits a shard once all its parts are in, exactly once."""

    def __init__(self, run_dir, laion: bool, total: int, sources: dict[str, str] | None = None):
        self.out, self.laion, self.total = run_dir.path, laion, total
        self.sources = sources or {}  # shard id -> input url, for its upstream (img2dataset) counts
        self.parts: dict[str, dict[int, dict]] = {}
        self.expected: dict[str, int] = {}
        self.finished: set[str] = set()
        self.errors: dict[str, str] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.duplicates = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, env: dict) -> None:
        shard, part = env["shard"], env["part"]
        if shard in self.errors:  # the rest of a failed shard
            return
        if shard in self.finished or part in self.parts.get(shard, ()):
            # A re-delivery (task retry, lineage reconstruction): identical to what we hold or
            # committed, because the stages are deterministic. Dropping it keeps exactly-once.
            self.duplicates += 1
            log.debug("dropping re-delivered part %d of shard %s", part, shard)
            return
        if env["error"]:
            self._fail(shard, env["error"])
            return
        self.parts.setdefault(shard, {})[part] = env
        for stage, s in json.loads(env["seconds"]).items():
            self.seconds[stage] += s
        if env["parts"] >= 0:
            self.expected[shard] = env["parts"]
        if len(self.parts[shard]) == self.expected.get(shard, -1):
            self._commit(shard)

    def _fail(self, shard: str, error: str, quiet: bool = False) -> None:
        self.errors[shard] = error
        self.finished.add(shard)
        self.parts.pop(shard, None)
        self.expected.pop(shard, None)
        if not quiet:
            log.error("shard %s failed: %s", shard, error)

    def abort(self, shards: list[str], error: str) -> None:
        """The Ray job stopped: every shard not yet committed is reported (committed ones stay)."""
        left = [s for s in shards if s not in self.finished]
        for shard in left:
            self._fail(shard, error, quiet=True)
        log.error("%d shards not committed; run the same command again to resume them", len(left))

    def _commit(self, shard: str) -> None:
        envs = self.parts.pop(shard)
        self.expected.pop(shard)
        batches = [unpack(envs[p]["payload"]) for p in sorted(envs) if envs[p]["rows"]]
        start = time.perf_counter()
        try:
            stats = write_shard(self.out, shard, batches, laion=self.laion, source=self.sources.get(shard))
        except Exception as err:  # noqa: BLE001 - as in the local runner: reported, the job goes on
            self._fail(shard, f"{type(err).__name__}: {err}")
            return
        self.seconds["Write"] += time.perf_counter() - start
        self.finished.add(shard)
        self.samples += stats["input"]
        elapsed = time.perf_counter() - self.start
        log.info("shard %s committed: %d samples (kept %d, rejected %d, failed %d) | %d/%d shards, "
                 "%.1f samples/s, %d shards buffered", shard, stats["input"], stats["kept"], stats["rejected"],
                 stats["failed"], len(self.finished), self.total, self.samples / max(elapsed, 1e-9),
                 len(self.parts))

    def finish(self, shards: list[str]) -> None:
        """Any shard that did not arrive whole is an error, never a silent loss."""
        for shard in shards:
            if shard in self.finished:
                continue
            got, want = len(self.parts.get(shard, {})), self.expected.get(shard)
            self._fail(shard, f"incomplete: {got} of {want if want is not None else '?'} parts arrived from Ray")
