"""Where the Ray runner runs: join the configured cluster, the job's cluster, or start a local Ray
(one that goes down with this driver however it dies); what one shard worker asks of the cluster;
and the check that every node sees a local output path."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import ray

log = logging.getLogger(__name__)

AUTH_MODE = "RAY_AUTH_MODE"  # Ray's own variable (ray-security/token-auth): set explicitly, Ray does not warn
_set_here: list[str] = []  # environment variables `connect` set, removed again by `ray_session`


def connect(config) -> tuple[bool, bool]:
    """Join the configured cluster, the job's cluster, or start a local Ray.

    Returns (connected here, started a local Ray here). Worker processes' own output stays in
    Ray's session logs (``log_to_driver=False``): the driver reports every shard's result and
    error itself, above capfilt's progress bar, instead of Ray's lines glued onto it."""
    if ray.is_initialized():  # a caller (a notebook, a test) already chose the cluster
        return False, False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:  # configured, or under `ray job submit` (RAY_ADDRESS)
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
        return True, False
    # "local": a fresh Ray of our own, never a stray cluster left running on this machine. Its
    # processes share this process's fate (Ray binds them to it with PR_SET_PDEATHSIG on Linux),
    # and each shard worker also watches this pid (pool.ShardActor), so none outlives a SIGKILL.
    # Ray 2.60 starts a local cluster without token authentication and warns about it on every run,
    # onto capfilt's progress bar. This Ray is private to this job and ends with it; a user who wants
    # a token sets RAY_AUTH_MODE=token themselves (then Ray asks for one, and we do not touch it).
    if AUTH_MODE not in os.environ:
        os.environ[AUTH_MODE] = "disabled"
        _set_here.append(AUTH_MODE)
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    log.info("starting a local Ray with %d CPUs", cpus)
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=config.ray.object_store_memory,
        log_to_driver=False,
    )
    return True, True


@contextmanager
def ray_session(config):
    """`connect`, and shut down on the way out the Ray this connected; yields whether it started a
    local Ray."""
    connected, local = connect(config)
    try:
        yield local
    finally:
        if connected:
            ray.shutdown()
        while _set_here:
            os.environ.pop(_set_here.pop(), None)


def actor_options(config) -> dict:
    """What one shard worker reserves: ``cpus_per_actor`` (default: its torch threads, capped at
    what one node of this cluster has), ``gpus_per_actor`` (fractions share a GPU), custom
    resources; and the retry policy (see the package docstring)."""
    rc = config.ray
    cpus = rc.cpus_per_actor if rc.cpus_per_actor is not None else float(config.threads)
    return {
        "num_cpus": cpus,
        "num_gpus": rc.gpus_per_actor,
        "resources": dict(rc.actor_resources),
        "max_restarts": rc.max_actor_restarts,
        # A call lost with its actor is retried on the restarted actor, without a bound: when a node
        # dies its actors' calls fail fast many times before Ray declares it dead and restarts them
        # elsewhere, and a finite budget can run out in that window. A redo writes the same bytes.
        "max_task_retries": -1,
    }


def request(options: dict) -> dict[str, float]:
    """The resources one shard worker requests, by Ray's names."""
    need = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
    return {name: amount for name, amount in need.items() if amount}


def fits(need: dict[str, float]) -> int:
    """How many shard workers the cluster's live nodes hold now, node by node (a worker runs on one
    node), read again as the cluster grows or shrinks."""
    count = 0
    for node in ray.nodes():
        if node.get("Alive"):
            have = node.get("Resources", {})
            count += int(min((have.get(name, 0.0) / amount for name, amount in need.items()), default=1 << 20) + 1e-9)
    return count


def check_fits(need: dict[str, float], started_local: bool) -> None:
    """Refuse a local Ray that cannot hold one worker: nothing would ever come to place it. On a
    cluster, an autoscaler may add the nodes: say so and wait."""
    if fits(need) >= 1:
        return
    have = ray.cluster_resources()
    msg = "a shard worker needs " + ", ".join(
        f"{n:g} {name} (the cluster has {have.get(name, 0):g})" for name, n in need.items()
    )
    if started_local:
        raise ValueError(msg + ": lower ray.cpus_per_actor, ray.gpus_per_actor or threads")
    log.warning("%s; waiting for the cluster to grow (autoscaler)", msg)


def describe_cluster() -> str:
    resources, nodes = ray.cluster_resources(), [n for n in ray.nodes() if n.get("Alive")]
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, {len(nodes)} nodes"


def check_output_shared(out: str, timeout: float = 120.0) -> None:
    """Refuse a local output path that some node of the cluster does not see.

    Under Ray the workers write the outputs, so a local path must be one file system every node
    mounts (NFS, a shared volume); an fsspec URL (``s3://``, ``gs://``) is reachable from every
    node by itself. "Local" is io/folder.py's one rule (`is_local`): a plain path, ``file://`` and
    ``local://`` alike. The driver writes a probe file there and every live node must see it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from capfilt.io.folder import is_local, local_path
    from capfilt.io.names import probe_name

    if not is_local(out):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    probe = local_path(out) / probe_name()
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
