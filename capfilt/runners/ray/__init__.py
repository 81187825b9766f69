"""The Ray runner: the local runner's stages on Ray Data, from a laptop to a GPU cluster.

This is the only package of capfilt that imports ``ray``. `run_ray` below is the driver loop;
the rest is in its modules:

* ``envelope``  one local batch as one Ray row: pack / unpack, stages over envelopes, `PartSink` (no Ray)
* ``assembly``  `ShardAssembler`: envelope metadata in, one commit per shard; `commit_shard` (no Ray)
* ``dataset``   the Ray Data pipeline: the plan, read and decode tasks, model actors, `build_dataset`
* ``cluster``   join a cluster or start a local Ray; size the actor pools; check the output is shared
* ``train``     `train_ray`: MED training on Ray Train (`capfilt train ... --workers N`)

Importing this package, ``envelope`` or ``assembly`` does not import ``ray``; `run_ray` does.

How rows flow
-------------
::

    from_items(shard urls)          one item per pending shard
    -> read      CPU tasks, at most ``ray.max_shards_in_flight`` at once: read_shard -> raw_to_row ->
                 the local runner's batches (``batch_size`` consecutive samples of one shard)
    -> Decode    CPU tasks (``ray.decode_concurrency``)
    -> Caption   actor pool (``ray.captioner_actors`` actors, ``ray.gpus_per_actor`` GPUs each),
    -> Filter    actor pool (``ray.filter_actors``)       each actor loads its model once
    -> Clip      actor pool (``ray.clip_actors``)
       Decide    in the last model actor (see `dataset.plan`)
    -> Edit      actor pool (``ray.edit_actors``), only when ``edit`` is set
       the operator that runs the last stage renders each finished batch into its share of the
                 shard's outputs and stores it as a *part file*, ``OUT/_parts/{shard}.{part:06d}.part``,
                 then drops the batch, pixels and all
    -> driver    ``iter_batches`` over envelopes without payload (address, rows, sizes, timings:
                 a few hundred bytes per batch); once a shard's parts are all stored it starts
                 one *commit task* for it
    commit task  on any worker: appends the parts in order with the local runner's ShardWriter
                 (cleaned tar, ledger, LAION parquet, stats), writes the marker last, deletes the
                 parts; returns the shard's counts to the driver

No image byte, text or score passes through the driver; every output file is written by a
worker, straight to the output location (a file system every node shares, or an object store:
``s3://``, ``gs://``; `cluster.check_output_shared` refuses a path some node cannot see).

A Ray row is one *envelope*: one batch of the local runner, packed (the stages' column dict,
pickled) with its address ``(shard, part)``. Packing whole batches, rather than one Ray row per
sample, is what makes the outputs byte-identical to the local runner's: the models see exactly
the batches the local runner gives them (float kernels block differently for other batch
shapes, so a sample's scores would change in their last bits with its batch-mates), and the
parts are the local runner's batches, rendered by the same `render` and appended by the same
`ShardWriter` in the same order. Ray Data handles envelopes as opaque rows: it may merge them
into blocks or split blocks between them, never inside one.

How a shard is known to be complete
-----------------------------------
Every envelope carries ``part`` (its index within the shard) and, on the shard's last one,
``parts`` (how many there are; the read task looks one batch ahead to know). An empty shard
sends one empty envelope (no part file), an unreadable shard one envelope carrying the error.
The driver keeps ``part -> rows`` per shard and commits when it holds ``parts`` distinct parts.

Exactly once
------------
* Every stage is a deterministic, pure function of its input rows (captions are seeded per key;
  no stage keeps state between batches), so a task Ray retries, an actor Ray restarts, or a lost
  block Ray reconstructs from lineage yields exactly the same envelope and the same part file,
  stored under the same name (temporary name + rename locally, one PUT on an object store).
* The driver drops any envelope whose ``(shard, part)`` it already holds or whose shard it has
  already handed to a commit task, so a re-delivered envelope can neither duplicate a sample nor
  commit a shard twice. The driver starts one commit task per shard.
* A commit task is idempotent (io/parts.py): it deletes the parts only after the marker, and a
  retry that finds the marker only cleans up; a task killed before its marker leaves every part,
  and Ray's retry (``ray.max_task_retries``) commits from them with identical bytes.
* A driver killed at any point leaves complete shards (marker present, never redone) and
  incomplete ones (no marker); the rerun sweeps their leftovers and stale parts, and redoes them
  with identical bytes.
* Hence Ray may retry freely. Model actors are restarted after a crash (``ray.max_actor_restarts``,
  unlimited by default, because a long job on preemptible nodes loses actors as a matter of
  course), and a call lost with its actor is retried until the actor is back (unbounded: a node
  that dies makes calls to its actors fail fast many times before Ray notices the death, and
  a bounded budget ran out in that window in our node-loss test). Read, decode and commit tasks
  lost with their worker or node are retried up to ``ray.max_task_retries`` times; past that the
  job stops, the shards not yet committed are reported as failed, and a rerun resumes them. A
  sample that crashes its actor process every time (segfault, OOM) is bounded only by
  ``ray.max_actor_restarts``; set it finite to stop such a loop. Exceptions a stage *raises*
  are not retried (``actor_task_retry_on_errors=False``; they would only repeat): as in the
  local runner, they fail their shard, and the job goes on.
* Ray Data may drop blocks that raise only if ``max_errored_blocks`` allows it; we pin it to 0,
  and at the end the driver reports any shard that did not arrive whole as an error, so nothing
  is lost silently either.

Memory
------
Ray Data streams with backpressure: every operator's output queue is bounded by the object
store budget, so a slow model stage pauses the reads rather than filling memory. The driver
holds a few integers per unfinished shard and the handles of at most
``ray.max_shards_in_flight`` running commit tasks; a commit task holds one part at a time and
streams the shard's files (shard_writer.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from capfilt.io.shards import shard_id
from capfilt.progress import progress_bar
from capfilt.runners.ray.assembly import ShardAssembler, commit_shard

log = logging.getLogger("capfilt")


def run_ray(config, urls: list[str], run_dir, progress: bool = True, owner: str | None = None) -> tuple[dict, dict]:
    """Run the pipeline over `urls` on Ray; workers write every output into `run_dir`. ``owner``:
    this run's lock token; a commit task writes its marker only while it still holds the lock.

    Returns (shard id -> error, stage -> seconds), as the local runner does."""
    from capfilt.runners.ray.cluster import check_output_shared, describe_cluster, ray_session, size_actors
    from capfilt.runners.ray.dataset import actor_device, build_dataset, configure_data_context, describe

    if not urls:
        return {}, {}
    actor_device(config)  # a device the actors cannot have fails here, before any work
    shards = [shard_id(u) for u in urls]
    out = os.fspath(run_dir.path.resolve() if isinstance(run_dir.path, Path) else run_dir.path)
    with ray_session(config) as started_local:
        config = size_actors(config, started_local)
        log.info("Ray cluster: %s", describe_cluster())
        log.info("pipeline: %s", describe(config, urls))
        check_output_shared(out)
        configure_data_context(config)
        commits = Commits(config, out, {shard_id(u): u for u in urls}, owner)
        with progress_bar(len(urls), progress) as bar:
            assembler = ShardAssembler(total=len(urls), commit=commits.submit, progress=bar)
            commits.assembler = assembler
            ds = build_dataset(config, urls, out)
            try:
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                    commits.received += block.nbytes
                    for env in block.to_pylist():
                        assembler.add(env)
                    commits.collect()
                commits.collect(wait=True)
            except Exception as err:
                log.exception("the Ray job stopped: %s: %s", type(err).__name__, err)
                commits.collect(wait=True)  # commits already started finish (or fail) on their own
                assembler.abort(
                    shards,
                    f"the Ray job stopped before this shard was committed: {type(err).__name__}: {str(err)[:2000]}",
                )
            assembler.finish(shards)
        if assembler.duplicates:
            log.info("dropped %d re-delivered parts (Ray retries); no shard was committed twice", assembler.duplicates)
        log.info(
            "the driver received %d bytes from Ray (metadata only) for %d bytes of parts the workers stored",
            commits.received,
            assembler.stored,
            extra={"driver_received": commits.received, "parts_stored": assembler.stored},
        )
        return assembler.errors, dict(assembler.seconds)


class Commits:
    """The commit tasks: at most ``ray.max_shards_in_flight`` running, the rest queued (in order)."""

    def __init__(self, config, out: str, sources: dict[str, str], owner: str | None = None):
        import ray

        self.ray, self.out, self.sources, self.owner = ray, out, sources, owner
        self.laion = config.decide.mode == "laion_coco"
        self.limit = max(1, config.ray.max_shards_in_flight)
        # No CPU reserved: a commit is mostly I/O, and must never wait behind Ray Data's tasks,
        # which may hold every CPU; the driver bounds how many run at once instead.
        self.task = ray.remote(commit_shard).options(
            num_cpus=0, max_retries=config.ray.max_task_retries, name="capfilt-commit"
        )
        self.running: dict = {}  # ObjectRef -> shard
        self.queued: list[tuple[str, list[int]]] = []
        self.assembler = None
        self.received = 0  # bytes the driver got from Ray: envelope blocks and commit results

    def submit(self, shard: str, parts: list[int]) -> None:
        self.queued.append((shard, parts))
        self._start()

    def _start(self) -> None:
        while self.queued and len(self.running) < self.limit:
            shard, parts = self.queued.pop(0)
            ref = self.task.remote(self.out, shard, parts, self.laion, self.sources.get(shard), self.owner)
            self.running[ref] = shard

    def collect(self, wait: bool = False) -> None:
        """Take the results of finished commits; with ``wait``, until none is running or queued."""
        while self.running:
            ready, _ = self.ray.wait(
                list(self.running), num_returns=1 if wait else len(self.running), timeout=None if wait else 0
            )
            for ref in ready:
                shard = self.running.pop(ref)
                try:
                    counts = self.ray.get(ref)
                    self.received += len(json.dumps(counts))
                    self.assembler.committed(shard, counts)
                except Exception as err:  # noqa: BLE001 - as a write error in the local runner: the shard fails
                    cause = getattr(err, "cause", None) or err
                    self.assembler.commit_failed(shard, f"{type(cause).__name__}: {cause}")
            self._start()
            if not wait:
                return
