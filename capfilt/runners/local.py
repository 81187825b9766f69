"""The local runner: one shard worker (runners/worker.py) in this process, shard after shard."""

from __future__ import annotations

import logging

from capfilt.progress import progress_bar
from capfilt.runners.worker import ShardWorker, row_batches, with_threads

__all__ = ["row_batches", "run_local", "add_seconds"]

log = logging.getLogger(__name__)


def add_seconds(total: dict, seconds: dict) -> None:
    """Sum one shard's stage seconds into the run's."""
    for stage, s in seconds.items():
        total[stage] = total.get(stage, 0.0) + s


def run_local(config, urls: list[str], run_dir, progress: bool = True, owner: str | None = None) -> tuple[dict, dict]:
    """Every shard of ``urls`` through one in-process `ShardWorker`; returns (shard id -> error,
    stage -> seconds). ``owner``: this run's lock token (no marker once another run holds the lock)."""
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    if not urls:
        return errors, seconds
    with progress_bar(len(urls), progress) as bar, ShardWorker(with_threads(config), run_dir.path, owner) as worker:
        for url in urls:
            result = worker.run(url, on_batch=bar.advance)
            add_seconds(seconds, result["seconds"])
            log.debug("shard %s: %s", result["shard"], result, extra={"shard_result": result})
            if result["error"]:
                errors[result["shard"]] = result["error"]
                bar.shard_failed()
            else:
                bar.shard_done(result["counts"])
    return errors, seconds
