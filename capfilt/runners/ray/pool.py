"""The shard workers on Ray: one actor per worker (`ShardActor`), and `WorkerPool`, the driver's loop
that hands each pending shard to an idle worker, grows the pool as the cluster grows, lets
workers go as shards run out, and retries a shard whose worker died for good.

Ray Core actors, not Ray Data: the unit of work is a whole shard and the only thing that comes
back is a few hundred bytes of counts, so Ray Data's blocks, operators and backpressure would
have nothing to carry; its process-global DataContext would need scoping; and its retry options
pass through arguments Ray 2.60 deprecates. An actor's options here are Ray Core's own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import ray

log = logging.getLogger(__name__)

RESIZE_EVERY = 5.0  # seconds between two looks at the cluster's resources while every worker is busy


class ShardActor:
    """A `ShardWorker` (runners/worker.py) in a Ray actor: the models load once, in `__init__`.

    ``driver``: the pid of the driver that started the local Ray this actor runs in; the actor
    exits as soon as that process is gone (a SIGKILLed driver cannot shut its Ray down)."""

    def __init__(self, config, out: str, owner: str | None, device: str, driver: int | None = None):
        from capfilt.runners.worker import ShardWorker

        if driver is not None:
            threading.Thread(target=_exit_without, args=(driver,), daemon=True, name="capfilt-driver-watch").start()
        self.worker = ShardWorker(config, out, owner, device=device)

    def ready(self) -> int:
        return os.getpid()

    def run(self, url: str) -> dict:
        return {**self.worker.run(url), "node": ray.get_runtime_context().get_node_id()}


def _exit_without(pid: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # alive, another user's: not ours to watch (never the case for our own Ray)
            return


class WorkerPool:
    """Runs ``urls`` on shard workers; ``done(url, result)`` is called on the driver for each."""

    def __init__(self, make, need: dict[str, float], min_size: int, max_size: int | None, retries: int):
        self.make, self.need = make, need  # make() -> a new actor handle
        self.min_size, self.max_size, self.retries = min_size, max_size, retries
        self.starting: dict = {}  # ready() ref -> actor, until the actor is placed and its models loaded
        self.idle: list = []
        self.busy: dict = {}  # run() ref -> (actor, url)
        self.started = self.lost = 0

    def size(self) -> int:
        return len(self.starting) + len(self.idle) + len(self.busy)

    def target(self, left: int) -> int:
        """Workers wanted now: those the cluster's resources hold (read now, so a pool grows with
        the cluster), or ``max_size`` when set (beyond what fits, pending actors ask an autoscaler
        for nodes); at least ``min_size``; never more than shards left."""
        from capfilt.runners.ray.cluster import fits

        want = self.max_size if self.max_size is not None else fits(self.need)
        return min(max(want, self.min_size), left)

    def run(self, urls: list[str], done) -> None:
        pending, attempts = deque(urls), {}
        last_resize = 0.0
        try:
            while pending or self.busy:
                if time.monotonic() - last_resize >= RESIZE_EVERY or not self.size():
                    for _ in range(self.target(len(pending) + len(self.busy)) - self.size()):
                        actor = self.make()
                        self.starting[actor.ready.remote()] = actor
                        self.started += 1
                    last_resize = time.monotonic()
                while self.idle and pending:
                    actor, url = self.idle.pop(), pending.popleft()
                    self.busy[actor.run.remote(url)] = (actor, url)
                while self.idle and len(self.idle) > len(pending) and self.size() > self.min_size:
                    ray.kill(self.idle.pop())  # no shard for it: give its resources back (autoscaler down)
                if not (pending or self.busy):
                    break
                ready, _ = ray.wait([*self.starting, *self.busy], num_returns=1, timeout=RESIZE_EVERY)
                for ref in ready:
                    if ref in self.starting:
                        self._placed(ref)
                    else:
                        self._finished(ref, pending, attempts, done)
        finally:
            for actor in [*self.starting.values(), *self.idle, *(a for a, _ in self.busy.values())]:
                ray.kill(actor)

    def _placed(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            pid = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # its models failed to load, or it died for good
            self.lost += 1
            if not (self.starting or self.idle or self.busy):
                raise RuntimeError(f"no shard worker could start: {err}") from err
            log.error("a shard worker could not start: %s", err)
            return
        log.debug("shard worker ready in pid %d", pid)
        self.idle.append(actor)

    def _finished(self, ref, pending: deque, attempts: dict, done) -> None:
        actor, url = self.busy.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:  # the worker died for good (restarts exhausted)
            self.lost += 1
            attempts[url] = attempts.get(url, 0) + 1
            if attempts[url] <= self.retries:
                log.warning("retrying a shard lost with its worker (%d/%d): %s", attempts[url], self.retries, url)
                pending.appendleft(url)
            else:
                done(url, None, f"lost with its worker {attempts[url]} times: {type(err).__name__}: {err}")
            return
        self.idle.append(actor)
        done(url, result, None)
