"""The Ray runner: shards scheduled onto a pool of shard workers, from a laptop to a GPU cluster.

This is the only package of capfilt that imports ``ray`` (importing it does not; `run_ray` does).

A shard worker is the local runner (`runners.worker.ShardWorker`), in a Ray actor
(`pool.ShardActor`): it loads every configured model once, then for each shard it is given reads
it, decodes the next batches on its own threads while its models compute, runs the stages, writes
the cleaned tar, ledger, stats (and LAION parquet) straight to the output location and its marker
last, and returns the shard's counts and stage seconds: a few hundred bytes. No image, text or
score passes through the driver or Ray's object store. The same code with the same batches and
the same torch thread count (`threads`, resolved once on the driver) is why Ray's outputs are the
local runner's bytes.

Modules: ``pool`` (the actor and the driver's scheduling loop), ``cluster`` (join or start Ray,
what a worker requests, the shared-output check), ``train`` (MED training on Ray Train).

Exactly once
------------
* A shard is done when its marker is written, last, by the worker that did it; a shard without a
  marker is redone from scratch, and a redo writes the same bytes (stages are pure functions of
  their rows; captions are seeded per key).
* A worker that dies (SIGKILL, OOM, its node lost) loses only its current shard's unmarked files.
  Ray restarts the actor (``ray.max_actor_restarts``, unlimited by default: preemptible nodes
  lose actors as a matter of course) and re-runs the lost call on it, so the shard is redone; if
  the worker is gone for good, the driver gives the shard to another worker, up to
  ``ray.max_task_retries`` times, then reports it failed (a rerun resumes it). A shard whose
  stages *raise* fails as in the local runner, and the job goes on.
* A worker writes its marker only while the run that started it still holds the output's lock
  (`worker.still_owner`): a worker outliving its killed driver cannot vouch for files a rerun
  has swept. A local Ray capfilt started goes down with its driver however the driver dies.
"""

from __future__ import annotations

import logging
import os
import pickle
import time

from capfilt.io.shards import shard_id
from capfilt.progress import progress_bar

log = logging.getLogger(__name__)


def actor_device(config) -> str:
    """The torch device inside a shard worker. Ray hides every GPU the actor did not reserve and
    numbers the reserved ones from 0, so `cuda:N` from a single-machine config becomes `cuda`."""
    if config.ray.gpus_per_actor > 0:
        return "cpu" if config.device == "cpu" else "cuda"
    if config.device not in ("auto", "cpu"):
        raise ValueError(f"device {config.device!r} under the Ray runner needs ray.gpus_per_actor > 0")
    return "cpu"


def run_ray(config, urls: list[str], run_dir, progress: bool = True, owner: str | None = None) -> tuple[dict, dict]:
    """Run the shards of ``urls`` on a pool of Ray shard workers that write every output into
    ``run_dir``. ``owner``: this run's lock token. Returns (shard id -> error, stage -> seconds
    summed over the workers), as the local runner does."""
    import ray

    from capfilt.runners.local import add_seconds
    from capfilt.runners.ray.cluster import (
        actor_options,
        check_fits,
        check_output_shared,
        describe_cluster,
        ray_session,
        request,
    )
    from capfilt.runners.ray.pool import ShardActor, WorkerPool
    from capfilt.runners.worker import with_threads

    if not urls:
        return {}, {}
    device = actor_device(config)  # a device the workers cannot have fails here, before any work
    config = with_threads(config)
    out = run_dir.folder.url_of()  # where every worker writes: an absolute path, or the store's URL
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    finished: set[str] = set()
    received = 0
    with ray_session(config) as started_local:
        options = actor_options(config)
        check_fits(request(options), started_local)
        log.info("Ray cluster: %s", describe_cluster())
        check_output_shared(out)
        rc = config.ray
        log.info(
            "%d shards on %s shard workers (%g CPU, %g GPU, %d torch threads each)",
            len(urls),
            f"{rc.min_actors}..{rc.max_actors or 'as the cluster holds'}",
            options["num_cpus"],
            options["num_gpus"],
            config.threads,
        )
        actor = ray.remote(ShardActor).options(**options)
        driver = os.getpid() if started_local else None
        start = time.perf_counter()
        with progress_bar(len(urls), progress) as bar:

            def done(url: str, result: dict | None, lost: str | None) -> None:
                nonlocal received
                shard = shard_id(url)
                finished.add(shard)
                if result is not None:
                    received += len(pickle.dumps(result))
                    add_seconds(seconds, result["seconds"])
                error = lost or result["error"]
                if error:
                    errors[shard] = error
                    log.error("shard %s failed: %s", shard, error)
                    bar.shard_failed()
                    return
                bar.advance(result["counts"]["input"])
                bar.shard_done(result["counts"])
                log.info(
                    "shard %s done: %d samples (kept %d, rejected %d, failed %d) in %.1f s, models waited %.1f s",
                    shard,
                    *(result["counts"][k] for k in ("input", "kept", "rejected", "failed")),
                    result["wall"],
                    result["waited"],
                    extra={"shard_result": result},
                )

            pool = WorkerPool(
                # The config goes inline with each actor's spec (a few kB), not through the object store: an
                # actor Ray restarts must find its constructor arguments whatever became of a stored object.
                lambda: actor.remote(config, out, owner, device, driver),
                request(options),
                rc.min_actors,
                rc.max_actors,
                rc.max_task_retries,
            )
            try:
                pool.run(urls, done)
            except Exception as err:
                log.exception("the Ray job stopped: %s: %s", type(err).__name__, err)
                for shard in {shard_id(u) for u in urls} - finished:
                    errors[shard] = f"the Ray job stopped before this shard was done: {type(err).__name__}: {err}"
        log.info(
            "the driver received %d bytes from Ray (per-shard counts only) for %d shards in %.1f s; "
            "%d workers started, %d lost",
            received,
            len(urls),
            time.perf_counter() - start,
            pool.started,
            pool.lost,
            extra={"driver_received": received, "workers_started": pool.started},
        )
    return errors, seconds
