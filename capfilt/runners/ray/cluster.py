"""Where the Ray runner runs: join the configured cluster, the job's cluster, or start a local Ray;
size the model actors against what the cluster has."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import ray

from capfilt.runners.ray.dataset import pool_size
from capfilt.stages import MODEL_STAGES

log = logging.getLogger("capfilt")


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
    ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=config.ray.object_store_memory
    )
    return True, True


def size_actors(config, connected_local: bool):
    """Resolve `ray.cpus_per_actor` against the cluster; refuse a local Ray that cannot fit the pools.

    Ray Data waits (forever, by default) for actors it cannot place. On a cluster with an
    autoscaler that is right; on a Ray we started ourselves nothing will ever come, so say so.
    """
    rc = config.ray
    n_actors = sum(pool_size(config, s) for s in MODEL_STAGES if getattr(config, s.section))
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
        msg = "the model actors need " + ", ".join(
            f"{n:g} {name} (the cluster has {have:g})" for name, (n, have) in short.items()
        )
        if connected_local:
            raise ValueError(msg + ": lower ray.*_actors, ray.cpus_per_actor or ray.gpus_per_actor")
        log.warning("%s; Ray Data waits until the cluster grows (autoscaler)", msg)
    return config.model_copy(update={"ray": rc.model_copy(update={"cpus_per_actor": per_actor})})


@contextmanager
def ray_session(config):
    """`connect`, and shut down on the way out the Ray this connected; yields whether it started a
    local Ray (for `size_actors`)."""
    connected, local = connect(config)
    try:
        yield local
    finally:
        if connected:
            ray.shutdown()


def describe_cluster() -> str:
    resources, nodes = ray.cluster_resources(), [n for n in ray.nodes() if n.get("Alive")]
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, {len(nodes)} nodes"


def check_output_shared(out: str, timeout: float = 120.0) -> None:
    """Refuse a local output path that some node of the cluster does not see.

    Under Ray the workers write the outputs, so a local path must be one file system every
    node mounts (NFS, a shared volume); an fsspec URL (``s3://``, ``gs://``) is reachable from
    every node by itself. The driver writes a probe file there and every live node must see it.
    """
    import uuid
    from pathlib import Path

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if "://" in out and not out.startswith("file://"):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    probe = Path(out.removeprefix("file://")) / f".capfilt-probe-{uuid.uuid4().hex[:8]}"
    probe.write_bytes(b"")
    try:
        sees = ray.remote(num_cpus=0)(_sees)
        refs = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes
        ]
        try:
            seen = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ValueError(
                f"could not check within {timeout:g} s that every Ray node sees the output {out}"
            ) from None
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted({host for ok, host in seen if not ok})
    if blind:
        raise ValueError(
            f"the output {out} is a local path that Ray node(s) {', '.join(blind)} do not see; "
            "under the Ray runner the workers write the outputs: use a file system every "
            "node mounts, or an object store (s3://…, gs://…)"
        )


def _sees(path: str) -> tuple[bool, str]:
    import socket

    return os.path.isfile(path), socket.gethostname()
