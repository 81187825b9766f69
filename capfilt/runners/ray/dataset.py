"""The Ray Data pipeline: which stages each operator runs (`plan`), the read and decode tasks,
the model actor pools, and `build_dataset`, the lazy Dataset of decided envelopes (the flow is
drawn in the package docstring).
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import pyarrow as pa
import ray

from capfilt.io.shards import shard_id
from capfilt.runners.local import row_batches
from capfilt.runners.ray.envelope import PartSink, apply_stages, envelope, pack, to_table, unpack
from capfilt.stages import MODEL_STAGES, STAGES, Caption, Clip, Decide, Edit, Filter, build_stages

log = logging.getLogger("capfilt")


def plan(config) -> list[tuple[type | None, tuple[type, ...]]]:
    """The Ray operators after the read: (model stage run by an actor pool, or None for CPU tasks;
    the stage classes the operator runs, in the local runner's order: every stage of STAGES once).

    A configured model stage opens an operator (its actor pool); every other stage rides along
    with the operator before it: Decode opens the CPU-task operator, an unconfigured model stage
    is a pass-through, and Decide runs in the actor of the last model stage before it (Clip's,
    say), or in the CPU tasks when none is set. With `edit` set, Edit opens the last operator,
    after Decide. Fewer operators mean fewer hops through the object store, and no CPU-task
    operator at the tail that Ray Data's resource budget could starve behind slow reads.
    """
    ops, model, chain = [], None, []
    for stage in STAGES:
        if stage in MODEL_STAGES and getattr(config, stage.section) is not None:
            ops.append((model, tuple(chain)))
            model, chain = stage, [stage]
        else:
            chain.append(stage)
    ops.append((model, tuple(chain)))
    return ops


def pool_size(config, stage: type) -> int:
    """``ray.{section}_actors``: the actors of a model stage's pool."""
    return getattr(config.ray, f"{stage.section}_actors")


def describe(config, urls: list[str]) -> str:
    rc = config.ray
    parts = [f"read {len(urls)} shards ({min(rc.max_shards_in_flight, len(urls))} at a time)"]
    for model, stages in plan(config):
        where = (
            "CPU tasks"
            if model is None
            else (f"{pool_size(config, model)} actors x {rc.cpus_per_actor:g} CPU + {rc.gpus_per_actor:g} GPU")
        )
        parts.append(f"{'+'.join(s.__name__ for s in stages)} [{where}]")
    return " -> ".join(parts)


def make_stages(config, stages: tuple[type, ...], device: str = "cpu") -> list:
    """The same stage objects the local runner builds (`build_stages`), for ``stages`` only: the
    config keeps just the model these stages load, so no other model is loaded here."""
    only = config.model_copy(update={"device": device, **{s.section: None for s in MODEL_STAGES if s not in stages}})
    return build_stages(only, stages)


def actor_device(config) -> str:
    """The torch device inside a model actor. Ray hides every GPU the actor did not reserve and
    numbers the reserved ones from 0, so `cuda:N` from a single-machine config becomes `cuda`."""
    if config.ray.gpus_per_actor > 0:
        return "cpu" if config.device == "cpu" else "cuda"
    if config.device not in ("auto", "cpu"):
        raise ValueError(f"device {config.device!r} under the Ray runner needs ray.gpus_per_actor > 0")
    return "cpu"


# --------------------------------------------------------------------------- read and decode (CPU tasks)


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
                yield to_table([envelope(shard, part, ahead is None, batch, seconds=spent)])
                part, batch, start = part + 1, ahead, time.perf_counter()
            if part == 0:  # a readable shard without samples is still committed (empty outputs)
                yield to_table([envelope(shard, 0, True, None)])
        except Exception as err:  # noqa: BLE001 - as in the local runner: the shard fails, the job goes on
            log.error("shard %s failed: %s: %s", shard, type(err).__name__, err)
            yield to_table([envelope(shard, part, True, None, error=f"{type(err).__name__}: {err}")])


def part_sink(config, stages: tuple[type, ...], out: str) -> PartSink | None:
    """The last operator (the one that runs the last stage: Edit, configured or a pass-through)
    stores each finished batch as its part file."""
    return PartSink(out, laion=config.decide.mode == "laion_coco") if STAGES[-1] in stages else None


def drops_pixels(stages: tuple[type, ...]) -> bool:
    """An operator that runs Decide but not the last stage (Decide's, when `edit` is set): no stage
    after Decide reads the decoded image, so it is dropped before the batch travels on (render
    writes the original image bytes)."""
    return Decide in stages and STAGES[-1] not in stages


def without_pixels(table: pa.Table) -> pa.Table:
    """The envelopes with their batches' decoded images (column ``image``) removed."""
    envelopes = table.to_pylist()
    for env in envelopes:
        if env["payload"]:
            batch = unpack(env["payload"])
            batch.pop("image", None)
            env["payload"] = pack(batch)
    return to_table(envelopes)


def run_operator(stages: list, table: pa.Table, sink: PartSink | None, drop_pixels: bool) -> pa.Table:
    out = apply_stages(stages, table, sink)
    return without_pixels(out) if drop_pixels else out


_CPU_STAGES: dict = {}  # per worker process: the model-free stage objects, built once


def decode(table: pa.Table, config, stages: tuple[type, ...], out: str) -> pa.Table:
    """CPU tasks: Decode, and the model-free stages after it (all of them when no model is set)."""
    key = (config.fingerprint(), stages)
    if key not in _CPU_STAGES:
        _CPU_STAGES[key] = make_stages(config, stages)
    return run_operator(_CPU_STAGES[key], table, part_sink(config, stages, out), drops_pixels(stages))


# --------------------------------------------------------------------------- model actors


class ModelActor:
    """One actor of a model stage's pool: loads its model once, then serves envelopes."""

    def __init__(self, config, stages: tuple[type, ...], out: str):
        import torch

        # Ray sets OMP_NUM_THREADS from the actor's CPUs; make torch agree explicitly. (CPU float
        # results depend on the thread count; same threads as the local runner -> same bits.)
        torch.set_num_threads(max(1, int(config.ray.cpus_per_actor)))
        self.stages = make_stages(config, stages, actor_device(config))
        self.sink = part_sink(config, stages, out)
        self.drop_pixels = drops_pixels(stages)
        log.info("%s actor ready in pid %d", stages[0].__name__, os.getpid())

    def __call__(self, table: pa.Table) -> pa.Table:
        return run_operator(self.stages, table, self.sink, self.drop_pixels)


# One class per pool, so that Ray's progress, logs and process titles name the model.
class CaptionActor(ModelActor):
    pass


class FilterActor(ModelActor):
    pass


class ClipActor(ModelActor):
    pass


class EditActor(ModelActor):
    pass


ACTOR_CLASSES = {Caption: CaptionActor, Filter: FilterActor, Clip: ClipActor, Edit: EditActor}


# --------------------------------------------------------------------------- the dataset


def build_dataset(config, urls: list[str], out: str):
    """The lazy Ray Dataset of these shard urls: its batches are stored as part files under
    ``out`` by the last operator, and its rows are their envelopes, without payload."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing Ray Core options (max_retries, max_restarts, max_task_retries)
        # through map_batches' **ray_remote_args, and names no replacement for them yet. They are
        # what makes the retry policy explicit ("Exactly once" in the package docstring), so we keep
        # passing them and hide only that one notice; the other warnings stay visible.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return _build_dataset(config, urls, out)


def _build_dataset(config, urls: list[str], out: str):
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    rc = config.ray
    # One envelope per call. A read or decode task that dies with its process or node is retried
    # up to ray.max_task_retries times, a model call until its actor is back (see "Exactly once"
    # in the package docstring for why a retry can neither duplicate nor lose a sample).
    common = {"batch_size": 1, "batch_format": "pyarrow"}
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(
        read_shards,
        **common,
        fn_kwargs={"config": config},
        compute=TaskPoolStrategy(size=min(rc.max_shards_in_flight, len(urls))),
        max_retries=rc.max_task_retries,
    )
    for model, stages in plan(config):
        if model is None:
            ds = ds.map_batches(
                decode,
                **common,
                fn_kwargs={"config": config, "stages": stages, "out": out},
                compute=TaskPoolStrategy(size=rc.decode_concurrency) if rc.decode_concurrency else None,
                udf_modifying_row_count=False,
                max_retries=rc.max_task_retries,
            )
            continue
        ds = ds.map_batches(
            ACTOR_CLASSES[model],
            **common,
            fn_constructor_kwargs={"config": config, "stages": stages, "out": out},
            compute=ActorPoolStrategy(size=pool_size(config, model)),
            num_cpus=rc.cpus_per_actor,
            num_gpus=rc.gpus_per_actor or None,
            resources=rc.actor_resources or None,
            udf_modifying_row_count=False,
            # A crashed actor is restarted and its lost calls re-run on the new one: safe, because a
            # call is a pure function of its envelope and the driver drops re-delivered envelopes.
            # Calls are retried without a bound (-1): when a node dies, calls to its actors fail
            # fast ("actor unavailable") many times before Ray declares the node dead and restarts
            # them elsewhere; any finite budget can run out in that window and fail the whole job.
            max_restarts=rc.max_actor_restarts,
            max_task_retries=-1,
        )
    return ds


def configure_data_context(config) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # capfilt's own bar (capfilt/progress.py) counts samples and shards
    ctx.max_errored_blocks = 0  # never let Ray Data drop a block: a lost sample is a bug, not noise
    ctx.actor_task_retry_on_errors = False  # a raised exception would only repeat (stages are pure)
    ctx.retried_map_errors = False
    # An actor that dies while loading its model (OOM, node lost) is replaced this many times in a row.
    ctx.max_consecutive_actor_init_deaths = config.ray.max_task_retries
