"""The Ray runner: the local runner's stages on Ray Data, from a laptop to a GPU cluster.

This is the only package of capfilt that imports ``ray``. `run_ray` below is the driver loop;
the rest is in its modules:

* ``envelope``  one local batch as one Ray row: pack / unpack, stages over envelopes (no Ray)
* ``assembly``  `ShardAssembler`: envelopes in, each shard committed exactly once (no Ray)
* ``dataset``   the Ray Data pipeline: the plan, read and decode tasks, model actors, `build_dataset`
* ``cluster``   join a cluster or start a local Ray; size the actor pools against it
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
    -> Score     actor pool (``ray.filter_actors``)       each actor loads its model once
    -> Rerank    actor pool (``ray.clip_actors``)
       Decide    in the last model actor (see `dataset.plan`); drops the decoded pixels
    -> driver    ``iter_batches`` over the stream; buffers each shard's parts and commits the shard
                 with ``write_shard`` (temp + rename, marker last) once every part has arrived

A Ray row is one *envelope*: one batch of the local runner, packed (the stages' column dict,
pickled) with its address ``(shard, part)``. Packing whole batches, rather than one Ray row per
sample, is what makes the outputs byte-identical to the local runner's: the models see exactly
the batches the local runner gives them (float kernels block differently for other batch
shapes, so a sample's scores would change in their last bits with its batch-mates), the ledger
rows come out in the same order, and variable-shape images, bytes and None survive Ray's block
format untouched. Ray Data handles envelopes as opaque rows: it may merge them into blocks or
split blocks between them, never inside one.

How a shard is known to be complete
-----------------------------------
Every envelope carries ``part`` (its index within the shard) and, on the shard's last one,
``parts`` (how many there are; the read task looks one batch ahead to know). An empty shard
sends one empty envelope, an unreadable shard one envelope carrying the error. The driver
keeps ``part -> envelope`` per shard and commits when it holds ``parts`` distinct parts.

Exactly once
------------
* Every stage is a deterministic, pure function of its input rows (captions are seeded per key;
  no stage keeps state between batches), so a task Ray retries, an actor Ray restarts, or a lost
  block Ray reconstructs from lineage yields exactly the same envelope again.
* The driver drops any envelope whose ``(shard, part)`` it already holds or whose shard it has
  already committed, so a re-delivered envelope can neither duplicate a sample nor commit a
  shard twice; a shard is committed by this driver alone, once.
* ``write_shard`` writes every file under a temporary name, renames it, and renames the marker
  last. A driver killed mid-commit leaves no marker; the rerun sweeps the temporaries and
  recommits the shard with identical bytes. Completed shards (marker present) are never
  redone.
* Hence Ray may retry freely. Model actors are restarted after a crash (``ray.max_actor_restarts``,
  unlimited by default, because a long job on preemptible nodes loses actors as a matter of
  course), and a call lost with its actor is retried until the actor is back (unbounded: a node
  that dies makes calls to its actors fail fast many times before Ray notices the death, and
  a bounded budget ran out in that window in our node-loss test). Read and decode tasks lost
  with their worker or node are retried up to ``ray.max_task_retries`` times; past that the job
  stops, the shards not yet committed are reported as failed, and a rerun resumes them. A
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
holds the parts of unfinished shards only (original image bytes, texts and scores; no decoded
pixels): the shards being read (at most ``ray.max_shards_in_flight``) and those whose last
batches are still in the pipeline (bounded by the object store budget above).
"""

from __future__ import annotations

import logging

from capfilt.io.shards import shard_id
from capfilt.runners.ray.assembly import ShardAssembler

log = logging.getLogger("capfilt")


def run_ray(config, urls: list[str], run_dir, progress: bool = True) -> tuple[dict, dict]:
    """Run the pipeline over `urls` on Ray, committing each shard into `run_dir` as it completes.

    Returns (shard id -> error, stage -> seconds), as the local runner does."""
    from capfilt.runners.ray.cluster import describe_cluster, ray_session, size_actors
    from capfilt.runners.ray.dataset import actor_device, build_dataset, configure_data_context, describe

    if not urls:
        return {}, {}
    actor_device(config)  # a device the actors cannot have fails here, before any work
    shards = [shard_id(u) for u in urls]
    with ray_session(config) as started_local:
        config = size_actors(config, started_local)
        log.info("Ray cluster: %s", describe_cluster())
        log.info("pipeline: %s", describe(config, urls))
        configure_data_context(config, progress)
        assembler = ShardAssembler(run_dir, laion=config.decide.mode == "laion_coco", total=len(urls),
                                   sources={shard_id(u): u for u in urls})
        ds = build_dataset(config, urls)
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                for env in block.to_pylist():
                    assembler.add(env)
        except Exception as err:  # noqa: BLE001 - retries exhausted: report, keep what is committed
            log.exception("the Ray job stopped: %s: %s", type(err).__name__, err)
            assembler.abort(shards, f"the Ray job stopped before this shard was committed: "
                                    f"{type(err).__name__}: {str(err)[:2000]}")
        assembler.finish(shards)
        if assembler.duplicates:
            log.info("dropped %d re-delivered parts (Ray retries); no shard was committed twice",
                     assembler.duplicates)
        return assembler.errors, dict(assembler.seconds)
