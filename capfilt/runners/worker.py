"""The shard worker: the one loop every runner runs, over one whole shard at a time.

`ShardWorker` builds the stages once (models loaded once per process, or per Ray actor) and then,
for each shard it is given: read -> batches -> stages -> `ShardWriter` straight to the output
location -> marker last. It returns only the shard's counts and the seconds its stages took.
The local runner runs one in this process; the Ray runner runs one per Ray actor and schedules
shards onto them (runners/ray/). The same code, the same batches and the same torch thread count
(`threads`, fixed here per worker) make the two runners' outputs the same bytes by construction.

While the models compute on a batch, the next batches are read and decoded on a small thread
pool (``decode_threads``), so the models never wait for JPEGs. Decode is a pure function of its
rows, so prefetching changes no output; the batches still reach the models in the shard's order.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

from capfilt.config import laion_mode
from capfilt.io.shard_writer import ShardWriter
from capfilt.io.shards import read_shard, shard_id
from capfilt.stages import STAGES, StageError, build_stages, run_stages
from capfilt.stages.rows import ROW_COLUMNS, raw_to_row

log = logging.getLogger(__name__)

COUNTS = ("input", "kept", "rejected", "failed")


def row_batches(url: str, config, batch_size: int):
    """Column batches of pipeline rows read from one shard."""
    rows = (raw_to_row(s, config.seed, config.decode.max_text_bytes) for s in read_shard(url))
    while chunk := list(islice(rows, batch_size)):
        yield {c: [r[c] for r in chunk] for c in ROW_COLUMNS}


def worker_threads(config) -> int:
    """The torch CPU threads of every shard worker of this run: ``threads``, else this machine's
    CPUs. The driver resolves it once and ships it in the config, so that a local worker and a
    Ray actor on any node use the same count (CPU float results depend on it)."""
    return config.threads or os.cpu_count() or 1


def with_threads(config):
    """The config with `threads` resolved (`worker_threads`)."""
    return config if config.threads else config.model_copy(update={"threads": worker_threads(config)})


class LockLost(RuntimeError):
    """Another run holds the output's lock now: this shard stops before its marker."""


def still_owner(out, owner: str):
    """A check run just before a shard's marker: the run that started this worker still holds the
    output's lock. A worker can outlive its killed driver; once a rerun has taken the lock over
    (and swept this shard's files), this worker's marker must not vouch for them."""
    from capfilt.io.run_lock import RunLock

    def check() -> None:
        holder = RunLock(out).holder() or {}
        if holder.get("token") != owner:
            raise LockLost(
                f"{out}: the run that started this worker no longer holds the output's lock "
                f"(now {holder.get('host', '?')} pid {holder.get('pid', '?')}); no marker written"
            )

    return check


class ShardWorker:
    """Holds the models; `run(url)` does one whole shard. ``owner``: the run's lock token (a shard's
    marker is written only while it holds the lock); ``device``: overrides ``config.device``."""

    def __init__(self, config, out, owner: str | None = None, device: str | None = None):
        import torch

        self.config, self.out, self.owner = config, out, owner
        self.laion = laion_mode(config.decide)
        self.threads = torch.get_num_threads()  # restored by close(): a caller's process keeps its own
        torch.set_num_threads(worker_threads(config))
        if device is not None:
            config = config.model_copy(update={"device": device})
        stages = build_stages(config) if out is None else self._build_recorded(config, out)
        # Decode runs on the pool, ahead of the models; every later stage in this thread, in order.
        self.decode, self.stages = (
            (stages[:1], stages[1:]) if stages and isinstance(stages[0], STAGES[0]) else ([], stages)
        )
        self.pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="capfilt-decode")

    @staticmethod
    def _build_recorded(config, out) -> list:
        """The stages, their hub models loaded at the commits the output's run.json recorded (the
        driver resolved them once; `presets.pinned`), not at what a revision names by now."""
        from capfilt.io.names import RUN_FILE
        from capfilt.io.run_read import read_run_json
        from capfilt.modeling.presets import pinned

        with pinned(read_run_json(out, RUN_FILE).get("models", {})):
            return build_stages(config)

    def run(self, url: str, on_batch=None) -> dict:
        """Read, decide and commit one shard. Returns {shard, counts, seconds, wall, waited, error}:
        counts from its stats (None if it failed), seconds per stage (summed over its batches),
        wall time, the seconds the models waited for decoded batches, and an error string (the local
        runner's wording) when the shard failed; a failed shard leaves no file under a final name."""
        shard, seconds, start = shard_id(url), {}, time.perf_counter()
        result = {"shard": shard, "counts": None, "seconds": seconds, "waited": 0.0, "error": None}
        writer = None
        try:
            writer = ShardWriter(self.out, shard, laion=self.laion, source=url)
            for batch, waited in self._decoded(url, seconds):
                result["waited"] += waited
                batch = run_stages(self.stages, batch, seconds)
                writer.add(batch)  # streamed out: the batch and its decoded pixels are dropped here
                if on_batch:
                    on_batch(len(batch["key"]))
            start_write = time.perf_counter()
            stats = writer.commit(before_marker=still_owner(self.out, self.owner) if self.owner else None)
            seconds["Write"] = seconds.get("Write", 0.0) + time.perf_counter() - start_write
            result["counts"] = {k: stats[k] for k in COUNTS}
        except LockLost as err:  # the files under final names are the rerun's now: delete nothing
            result["error"] = f"{type(err).__name__}: {err}"
        except Exception as err:  # noqa: BLE001 - a shard that cannot be done is reported, the job goes on
            if writer is not None:
                writer.abort()
            result["error"] = str(err) if isinstance(err, StageError) else f"{type(err).__name__}: {err}"
        if result["error"]:
            log.error("shard %s failed: %s", shard, result["error"])
        result["wall"] = time.perf_counter() - start
        return result

    def _decoded(self, url: str, seconds: dict):
        """(decoded batch, seconds waited for it), in the shard's order: one thread reads batches
        and hands each to the pool to decode; at most ``decode_threads + 1`` are ahead."""
        ahead: queue.Queue = queue.Queue(maxsize=self.config.decode_threads + 1)
        stop = threading.Event()

        def decode(batch):
            spent: dict = {}
            return run_stages(self.decode, batch, spent), spent

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read():
            try:
                for batch in row_batches(url, self.config, self.config.batch_size):
                    if not put(self.pool.submit(decode, batch)):
                        return
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                put(err)
                return
            put(None)

        reader = threading.Thread(target=read, name=f"capfilt-read-{shard_id(url)}", daemon=True)
        reader.start()
        try:
            while True:
                start = time.perf_counter()
                item = ahead.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, spent = item.result()
                waited = time.perf_counter() - start
                for name, s in spent.items():
                    seconds[name] = seconds.get(name, 0.0) + s
                yield batch, waited
        finally:
            stop.set()
            reader.join()

    def close(self) -> None:
        import torch

        self.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
