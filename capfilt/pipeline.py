"""One CapFilt run: resolve models, prepare the output directory, run a runner, summarise."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from capfilt.config import RunConfig
from capfilt.io.run_dir import RunDir, check_apart
from capfilt.io.run_lock import RunLock
from capfilt.io.shards import expand_shards, shard_id

log = logging.getLogger("capfilt")


def model_identities(config: RunConfig) -> dict:
    """Identity of every configured model (hub id + revision, or sha256 of local weights)."""
    from capfilt.modeling.presets import resolve_blip, resolve_clip

    models = {}
    if config.captioner:
        models["captioner"] = resolve_blip(config.captioner.model, "captioner", config.captioner.revision).identity
    if config.filter:
        models["filter"] = resolve_blip(config.filter.model, "filter", config.filter.revision).identity
    if config.clip:
        models["clip"] = resolve_clip(config.clip.model, config.clip.pretrained)[2]
    return models


@dataclass
class RunResult:
    summary: dict
    seconds: float
    shard_errors: dict = field(default_factory=dict)
    stage_seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.shard_errors and self.summary["shards_done"] == self.summary["shards"]


def run(config: RunConfig, fresh: bool = False, progress: bool = True) -> RunResult:
    if not config.input:
        raise ValueError("no input shards: set `input` in the config or pass --input")
    if not config.output:
        raise ValueError("no output directory: set `output` in the config or pass --output")
    urls = expand_shards(config.input)
    # Before anything is written or deleted: the output must lie apart from the inputs' folders,
    # and no other run may be using it (the lock is released however this run ends).
    check_apart(config.output, urls)
    with RunLock(config.output):
        return _run_locked(config, urls, fresh, progress)


def _run_locked(config: RunConfig, urls: list[str], fresh: bool, progress: bool) -> RunResult:
    run_dir = RunDir(config.output)
    swept = run_dir.prepare(config, model_identities(config), fresh=fresh)
    if swept:
        log.info("swept %d partial files left by an interrupted run", len(swept))
    pending = [u for u in urls if not run_dir.done(shard_id(u))]
    log.info("%d shards, %d already complete, %d to do", len(urls), len(urls) - len(pending), len(pending))
    start = time.perf_counter()
    if config.runner == "ray":
        from capfilt.runners.ray import run_ray

        errors, stage_seconds = run_ray(config, pending, run_dir, progress=progress)
    else:
        from capfilt.runners.local import run_local

        errors, stage_seconds = run_local(config, pending, run_dir, progress=progress)
    summary = run_dir.summary([shard_id(u) for u in urls], errors)
    return RunResult(summary, time.perf_counter() - start, errors, stage_seconds)
