"""One CapFilt run: check what it names, resolve models, prepare the output directory, run a runner, summarise.

Everything a user can get wrong is checked before anything is written or any model loads: the
shards, the output location (apart from the inputs, writable), the device, and every model
reference (`capfilt.modeling.presets`). A start that fails later, before any shard completes,
leaves nothing that blocks the corrected rerun: its run.json is replaced.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from capfilt.config import ConfigError, RunConfig
from capfilt.io.apart import check_apart
from capfilt.io.folder import is_local, local_path
from capfilt.io.run_dir import RunDir
from capfilt.io.run_lock import RunLock
from capfilt.io.shards import expand_shards, shard_id

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """The output location cannot be written."""


def model_identities(config: RunConfig) -> dict:
    """Identity of every configured model (hub id + revision + the commit it resolved to, or sha256
    of local weights).

    Resolving checks each reference (and builds presets), so a bad one fails here, before any
    model loads: `ModelRefError` naming the config key."""
    from capfilt.modeling.presets import resolve_blip, resolve_clip

    models = {}
    if config.captioner:
        from capfilt.modeling.families import resolve

        cap = config.captioner  # a BLIP captioner's identity as before; another family's names its family
        models["captioner"] = resolve(cap.model, cap.family, cap.revision, cap.pretrained).identity
    if config.filter:
        models["filter"] = resolve_blip(config.filter.model, "filter", config.filter.revision).identity
    if config.clip:  # every model of the chain, checked here; a chain of one as before (same fingerprint)
        chain = [resolve_clip(link.model, link.pretrained)[2] for link in config.clip.chain]
        models["clip"] = chain[0] if len(chain) == 1 else chain
    if config.edit:
        from capfilt.modeling.editor import resolve_editor

        models["edit"] = resolve_editor(config.edit.model, config.edit.revision).identity
    if config.quality or config.watermark:  # LAION's heads (modeling/heads.py)
        from capfilt.modeling.heads import resolve_head

        heads = {f"quality.{c}": getattr(config.quality, c) for c in ("aesthetic", "punsafe") if config.quality}
        heads["watermark"] = config.watermark
        for what, head in heads.items():
            if head is not None:
                models[what.split(".")[-1]] = resolve_head(head.model, f"{what}.model", head.revision)[1]
    return models


def check_device(config: RunConfig) -> None:
    """The local runner's device must exist here (the Ray runner checks its actors' own)."""
    if config.runner != "local" or config.device in ("auto", "cpu"):
        return  # (without importing torch: a refused start stays quick)
    import torch

    try:
        device = torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {config.device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else " (this torch is a CPU-only build)"
            raise ConfigError(
                f"device {config.device}: no CUDA device is available here{build}; use --device cpu, or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {config.device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {config.device}: MPS is not available here; use --device cpu, or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {config.device}: capfilt runs on cpu, cuda or mps")


def check_output_writable(output: str) -> None:
    """A local output must be (or be creatable as) a directory this process can write to. Object
    stores are left to their first write: credentials and permissions show only there."""
    if not is_local(output):
        return
    path = local_path(output).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {output} is a file, not a directory; choose another --output")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"output {output}: {existing} is a file, so no directory can be made there; choose another --output"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(existing) else "not writable by this user"
        raise OutputError(f"output {output}: {existing} is {why}; choose another --output")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@dataclass
class RunResult:
    summary: dict
    seconds: float
    shard_errors: dict = field(default_factory=dict)
    stage_seconds: dict = field(default_factory=dict)
    processed: int = 0  # samples of the shards this run did (not those a resumed run skipped)

    @property
    def ok(self) -> bool:
        return not self.shard_errors and self.summary["shards_done"] == self.summary["shards"]


def run(config: RunConfig, fresh: bool = False, progress: bool = True) -> RunResult:
    if not config.input:
        raise ConfigError("no input shards: set `input` in the config or pass --input")
    if not config.output:
        raise ConfigError("no output directory: set `output` in the config or pass --output")
    urls = expand_shards(config.input)
    # Before anything is written or deleted: the output must lie apart from the inputs' folders and
    # be writable, the device must exist, and every model reference must name something loadable.
    check_apart(config.output, urls)
    check_output_writable(config.output)
    check_device(config)
    models = model_identities(config)
    # Refused while nothing is written (not even the lock): an output that holds files of no capfilt run.
    RunDir(config.output).check_own([shard_id(u) for u in urls])
    # No other run may be using the output (the lock is released however this run ends).
    with RunLock(config.output) as lock:
        return _run_locked(config, urls, models, fresh, progress, lock.token)


def _run_locked(config: RunConfig, urls: list[str], models: dict, fresh: bool, progress: bool, owner: str) -> RunResult:
    run_dir = RunDir(config.output)
    swept = run_dir.prepare(config, models, fresh=fresh, shards=[shard_id(u) for u in urls])
    if swept:
        log.info("swept %d partial files left by an interrupted run", len(swept))
    todo = set(run_dir.folder.incomplete([shard_id(u) for u in urls]))
    pending = [u for u in urls if shard_id(u) in todo]
    log.info("%d shards, %d already complete, %d to do", len(urls), len(urls) - len(pending), len(pending))
    start = time.perf_counter()
    if config.runner == "ray":
        from capfilt.runners.ray import run_ray

        errors, stage_seconds = run_ray(config, pending, run_dir, progress=progress, owner=owner)
    else:
        from capfilt.runners.local import run_local

        errors, stage_seconds = run_local(config, pending, run_dir, progress=progress, owner=owner)
    summary = run_dir.summary([shard_id(u) for u in urls], errors)
    processed = run_dir.samples_in([shard_id(u) for u in pending])
    return RunResult(summary, time.perf_counter() - start, errors, stage_seconds, processed)
