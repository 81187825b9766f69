"""The Ray runner: the local runner's stages on Ray Data, from a laptop to a GPU cluster.

This is the only module of capfilt that imports ``ray``; it also holds `train_ray`, multi-worker
MED training on Ray Train (at the end of the file).

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
       Decide    in the last model actor (see `plan`); drops the decoded pixels
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

import json
import logging
import os
import pickle
import time
import warnings
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import ray

from capfilt.io.output import write_shard
from capfilt.io.shards import shard_id
from capfilt.runners.local import row_batches

log = logging.getLogger("capfilt")

# One Ray row = one batch of the local runner. `parts` is set on a shard's last envelope only.
ENVELOPE = pa.schema([
    ("shard", pa.string()),
    ("part", pa.int64()),
    ("parts", pa.int64()),
    ("rows", pa.int64()),
    ("error", pa.string()),
    ("seconds", pa.string()),  # JSON {stage: seconds spent on this batch}
    ("payload", pa.large_binary()),  # pickled column dict, exactly what the stages return
])

MODEL_STAGES = {"Caption": "captioner", "Score": "filter", "Rerank": "clip"}
ACTORS = {"Caption": "captioner_actors", "Score": "filter_actors", "Rerank": "clip_actors"}


def pack(batch: dict) -> bytes:
    return pickle.dumps(batch, protocol=5)


def unpack(payload: bytes) -> dict:
    return pickle.loads(payload)


def _table(envelopes: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(envelopes, schema=ENVELOPE)


def _envelope(shard: str, part: int, last: bool, batch: dict | None, error: str = "", seconds=None) -> dict:
    rows = len(batch["key"]) if batch else 0
    return {"shard": shard, "part": part, "parts": part + 1 if last else -1, "rows": rows, "error": error,
            "seconds": json.dumps(seconds or {}), "payload": pack(batch) if batch else b""}


# --------------------------------------------------------------------------- read (CPU tasks)


def read_shards(items: dict, config):
    """Shard urls in, their envelopes out: streamed, one block per batch of the local runner."""
    for url in items["url"]:
        url = str(url)
        shard, part = shard_id(url), 0
        start = time.perf_counter()
        try:
            batches = row_batches(url, config, config.batch_size)  # the local runner's very batches
            batch = next(batches, None)
            while batch is not None:
                ahead = next(batches, None)  # one batch ahead: is this the shard's last part?
                spent = {"Read": time.perf_counter() - start}
                yield _table([_envelope(shard, part, ahead is None, batch, seconds=spent)])
                part, batch, start = part + 1, ahead, time.perf_counter()
            if part == 0:  # a readable shard without samples is still committed (empty outputs)
                yield _table([_envelope(shard, 0, True, None)])
        except Exception as err:  # noqa: BLE001 - as in the local runner: the shard fails, the job goes on
            log.error("shard %s failed: %s: %s", shard, type(err).__name__, err)
            yield _table([_envelope(shard, part, True, None, error=f"{type(err).__name__}: {err}")])


# --------------------------------------------------------------------------- stages on envelopes


def plan(config) -> list[tuple[str | None, tuple[str, ...]]]:
    """The Ray operators after the read: (model stage run by an actor pool, or None for CPU tasks;
    the stages the operator runs, in the local runner's order).

    Model-free stages ride along with the operator before them: Decode opens the CPU-task
    operator, an unconfigured model stage is a pass-through, and Decide runs in the last model
    actor. Fewer operators mean fewer hops through the object store, and no CPU-task operator
    at the tail that Ray Data's resource budget could starve behind slow reads.
    """
    ops, model, chain = [], None, ["Decode"]
    for stage, section in MODEL_STAGES.items():
        if getattr(config, section) is None:
            chain.append(stage)
        else:
            ops.append((model, tuple(chain)))
            model, chain = stage, [stage]
    ops.append((model, (*chain, "Decide")))
    return ops


def make_stages(config, names: tuple[str, ...], device: str = "cpu") -> list[tuple[str, object]]:
    """The same stage objects the local runner builds (pipeline.build_stages), for `names` only:
    the config keeps just the model these stages load, so no other model is loaded here."""
    from capfilt.pipeline import build_stages

    keep = {MODEL_STAGES[n] for n in names if n in MODEL_STAGES}
    only = config.model_copy(update={"device": device,
                                     **{section: None for section in MODEL_STAGES.values() if section not in keep}})
    built = {type(obj).__name__: obj for obj in build_stages(only)}
    return [(name, built[name]) for name in names]


def apply_stages(stages: list[tuple[str, object]], table: pa.Table) -> pa.Table:
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
        batch, seconds = unpack(env["payload"]), json.loads(env["seconds"])
        for name, stage in stages:
            start = time.perf_counter()
            try:
                batch = stage(batch)
            except Exception as err:  # noqa: BLE001
                log.error("shard %s failed in %s: %s: %s", env["shard"], name, type(err).__name__, err)
                env = {**env, "error": f"{type(err).__name__}: {err}", "payload": b""}
                break
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            if name == "Decide":
                batch.pop("image", None)
        else:
            env = {**env, "payload": pack(batch), "seconds": json.dumps(seconds)}
        out.append(env)
    return _table(out)


_CPU_STAGES: dict = {}  # per worker process: the model-free stage objects, built once


def decode(table: pa.Table, config, stages: tuple[str, ...]) -> pa.Table:
    """CPU tasks: Decode, and the model-free stages after it (all of them when no model is set)."""
    key = (config.fingerprint(), stages)
    if key not in _CPU_STAGES:
        _CPU_STAGES[key] = make_stages(config, stages)
    return apply_stages(_CPU_STAGES[key], table)


def actor_device(config) -> str:
    """The torch device inside a model actor. Ray hides every GPU the actor did not reserve and
    numbers the reserved ones from 0, so `cuda:N` from a single-machine config becomes `cuda`."""
    if config.ray.gpus_per_actor > 0:
        return "cpu" if config.device == "cpu" else "cuda"
    if config.device not in ("auto", "cpu"):
        raise ValueError(f"device {config.device!r} under the Ray runner needs ray.gpus_per_actor > 0")
    return "cpu"


class ModelActor:
    """One actor of a model stage's pool: loads its model once, then serves envelopes."""

    def __init__(self, config, stages: tuple[str, ...]):
        import torch

        # Ray sets OMP_NUM_THREADS from the actor's CPUs; make torch agree explicitly. (CPU float
        # results depend on the thread count; same threads as the local runner -> same bits.)
        torch.set_num_threads(max(1, int(config.ray.cpus_per_actor)))
        self.stages = make_stages(config, stages, actor_device(config))
        log.info("%s actor ready in pid %d", stages[0], os.getpid())

    def __call__(self, table: pa.Table) -> pa.Table:
        return apply_stages(self.stages, table)


# One class per pool, so that Ray's progress, logs and process titles name the model.
class CaptionActor(ModelActor):
    pass


class ScoreActor(ModelActor):
    pass


class RerankActor(ModelActor):
    pass


ACTOR_CLASSES = {"Caption": CaptionActor, "Score": ScoreActor, "Rerank": RerankActor}


# --------------------------------------------------------------------------- the dataset


def build_dataset(config, urls: list[str]):
    """The lazy Ray Dataset of decided envelopes for these shard urls."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing Ray Core options (max_retries, max_restarts, max_task_retries)
        # through map_batches' **ray_remote_args, and names no replacement for them yet. They are
        # what makes the retry policy explicit (see "Exactly once"), so we keep passing them and
        # hide only that one notice; the other warnings stay visible.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return _build_dataset(config, urls)


def _build_dataset(config, urls: list[str]):
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    rc = config.ray
    # One envelope per call; every task and actor call that dies with its process or node is
    # retried, a bounded number of times (see "Exactly once" for why a retry can neither
    # duplicate nor lose a sample).
    common = {"batch_size": 1, "batch_format": "pyarrow"}
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(read_shards, **common, fn_kwargs={"config": config},
                        compute=TaskPoolStrategy(size=min(rc.max_shards_in_flight, len(urls))),
                        max_retries=rc.max_task_retries)
    for model, stages in plan(config):
        if model is None:
            ds = ds.map_batches(
                decode, **common, fn_kwargs={"config": config, "stages": stages},
                compute=TaskPoolStrategy(size=rc.decode_concurrency) if rc.decode_concurrency else None,
                udf_modifying_row_count=False, max_retries=rc.max_task_retries)
            continue
        ds = ds.map_batches(
            ACTOR_CLASSES[model], **common, fn_constructor_kwargs={"config": config, "stages": stages},
            compute=ActorPoolStrategy(size=getattr(rc, ACTORS[model])),
            num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_actor or None, resources=rc.actor_resources or None,
            udf_modifying_row_count=False,
            # A crashed actor is restarted and its lost calls re-run on the new one: safe, because a
            # call is a pure function of its envelope and the driver drops re-delivered envelopes.
            # Calls are retried without a bound (-1): when a node dies, calls to its actors fail
            # fast ("actor unavailable") many times before Ray declares the node dead and restarts
            # them elsewhere; any finite budget can run out in that window and fail the whole job.
            max_restarts=rc.max_actor_restarts, max_task_retries=-1,
        )
    return ds


def configure_data_context(config, progress: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = 0  # never let Ray Data drop a block: a lost sample is a bug, not noise
    ctx.actor_task_retry_on_errors = False  # a raised exception would only repeat (stages are pure)
    ctx.retried_map_errors = False
    # An actor that dies while loading its model (OOM, node lost) is replaced this many times in a row.
    ctx.max_consecutive_actor_init_deaths = config.ray.max_task_retries


# --------------------------------------------------------------------------- the driver side


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


def connect(config) -> tuple[bool, bool]:
    """Join the configured cluster, the job's cluster, or start a local Ray.

    Returns (connected here, started a local Ray here)."""
    if ray.is_initialized():  # a caller (a notebook, a test) already chose the cluster
        return False, False
    address = config.ray.address
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address)
        return True, False
    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointed at a cluster
        log.info("joining Ray cluster at %s (RAY_ADDRESS)", os.environ["RAY_ADDRESS"])
        ray.init()
        return True, False
    # "local": a fresh Ray of our own, never a stray cluster left running on this machine.
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    log.info("starting a local Ray with %d CPUs", cpus)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False,
             object_store_memory=config.ray.object_store_memory)
    return True, True


def size_actors(config, connected_local: bool):
    """Resolve `ray.cpus_per_actor` against the cluster; refuse a local Ray that cannot fit the pools.

    Ray Data waits (forever, by default) for actors it cannot place. On a cluster with an
    autoscaler that is right; on a Ray we started ourselves nothing will ever come, so say so.
    """
    rc = config.ray
    n_actors = sum(getattr(rc, ACTORS[s]) for s, section in MODEL_STAGES.items() if getattr(config, section))
    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0.0)
    per_actor = rc.cpus_per_actor
    if per_actor is None:
        for_tasks = min(1.0, cpus / 2)  # decoding and deciding must always find a CPU
        per_actor = 1.0 if not n_actors else max(0.01, min(1.0, (cpus - for_tasks) / n_actors))
        per_actor = float(f"{per_actor:.2f}")
    need = {"CPU": n_actors * per_actor, "GPU": n_actors * rc.gpus_per_actor}
    need.update({name: n_actors * amount for name, amount in rc.actor_resources.items()})
    short = {name: (n, resources.get(name, 0.0)) for name, n in need.items() if n > resources.get(name, 0.0)}
    if short:
        msg = "the model actors need " + ", ".join(f"{n:g} {name} (the cluster has {have:g})"
                                                   for name, (n, have) in short.items())
        if connected_local:
            raise ValueError(msg + ": lower ray.*_actors, ray.cpus_per_actor or ray.gpus_per_actor")
        log.warning("%s; Ray Data waits until the cluster grows (autoscaler)", msg)
    return config.model_copy(update={"ray": rc.model_copy(update={"cpus_per_actor": per_actor})})


def describe(config, urls: list[str]) -> str:
    rc = config.ray
    parts = [f"read {len(urls)} shards ({min(rc.max_shards_in_flight, len(urls))} at a time)"]
    for model, stages in plan(config):
        where = "CPU tasks" if model is None else (
            f"{getattr(rc, ACTORS[model])} actors x {rc.cpus_per_actor:g} CPU + {rc.gpus_per_actor:g} GPU")
        parts.append(f"{'+'.join(stages)} [{where}]")
    return " -> ".join(parts)


def run_ray(config, urls: list[str], run_dir, progress: bool = True) -> tuple[dict, dict]:
    if not urls:
        return {}, {}
    actor_device(config)  # a device the actors cannot have fails here, before any work
    shards = [shard_id(u) for u in urls]
    connected, local = connect(config)
    try:
        config = size_actors(config, local)
        resources = ray.cluster_resources()
        log.info("Ray cluster: %g CPUs, %g GPUs, %d nodes", resources.get("CPU", 0), resources.get("GPU", 0),
                 len([n for n in ray.nodes() if n.get("Alive")]))
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
    finally:
        if connected:
            ray.shutdown()


# --------------------------------------------------------------------------- Ray Train
# Multi-worker MED training (`capfilt train ... --workers N`) with Ray Train's `TorchTrainer` (DDP).
# Each worker runs the same `capfilt.train.loop.train` as the single-process path, on its share of
# every micro-batch; Ray sets up the process group (gloo on CPU, nccl on GPU). Checkpoints and
# exports are written by rank 0 straight into `output`, so on a cluster `output` must be on storage
# every worker sees (NFS, a mounted bucket); resume works as in the single-process path.


def _train_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from capfilt.train.config import TrainConfig
    from capfilt.train.loop import train

    torch.set_num_threads(loop_config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.model_validate(loop_config["config"])
    device = "cpu"
    if cfg.ray.use_gpu:
        device = str(ray.train.torch.get_device())
    result = train(cfg, resume=loop_config["resume"], progress=False, rank=rank, world=world, device=device,
                   stop_after=loop_config["stop_after"], report=ray.train.report)
    if rank == 0:
        summary = {"step": result["step"], "losses": result["losses"], "outputs": result["outputs"], "world": world}
        (Path(cfg.output) / "ray_result.json").write_text(json.dumps(summary))


def train_ray(cfg, *, resume: bool = False, stop_after: int | None = None,
              num_cpus: int | None = None) -> dict:
    """Run `cfg` on `cfg.workers` Ray Train workers; returns what the single-process `train` returns.

    Joins `cfg.ray.address` when set, else starts a local Ray (with `num_cpus`) and shuts it down
    afterwards; an already initialised Ray is used as it is.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"output": str(out)})
    (out / "ray_result.json").unlink(missing_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray.address, num_cpus=None if cfg.ray.address else num_cpus,
                 include_dashboard=False, log_to_driver=True)
    try:
        threads = max(1, int(cfg.ray.cpus_per_worker))  # a worker's torch threads stay within its CPU share
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"config": cfg.model_dump(), "resume": resume, "stop_after": stop_after,
                               "threads": threads},
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
            run_config=RunConfig(name=f"capfilt-{cfg.task}", storage_path=str(out / "ray")),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    summary_path = out / "ray_result.json"
    if not summary_path.is_file():
        raise RuntimeError(f"Ray Train finished without a result from rank 0 (see the logs under {out / 'ray'})")
    return json.loads(summary_path.read_text())
