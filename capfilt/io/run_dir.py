"""The output directory of a run: run.json, resume checks, completed shards, the run summary."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from capfilt.io.output import SUBDIRS, atomic_write, sweep_partials
from capfilt.records import empty_stats

PACKAGES = ("capfilt", "torch", "transformers", "open_clip_torch", "webdataset", "pyarrow", "ray", "pillow")


class ResumeRefused(RuntimeError):
    """The output directory holds a run with a different config or models."""


def package_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(config, models: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([config.fingerprint(), models], sort_keys=True).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def done(self, shard: str) -> bool:
        return (self.path / "_done" / f"{shard}.done").is_file()

    def prepare(self, config, models: dict, fresh: bool = False) -> list[Path]:
        """Check (or start) the run in this directory; returns swept partial files."""
        run_json = self.path / "run.json"
        fp = fingerprint(config, models)
        if fresh:
            for sub in SUBDIRS:
                shutil.rmtree(self.path / sub, ignore_errors=True)
            for name in ("run.json", "summary.json"):
                (self.path / name).unlink(missing_ok=True)
        elif run_json.is_file():
            previous = json.loads(run_json.read_text())
            if previous.get("fingerprint") != fp:
                raise ResumeRefused(
                    f"{self.path} holds a run with a different config or models "
                    f"(fingerprint {previous.get('fingerprint')} != {fp}). Resuming would mix outputs of two "
                    "configurations. Use a new --output, or --fresh to discard the old outputs."
                )
        self.path.mkdir(parents=True, exist_ok=True)
        swept = sweep_partials(self.path)
        record = {
            "fingerprint": fp,
            "config": config.model_dump(mode="json"),
            "models": models,
            "versions": package_versions(),
            "host": platform.node(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write(run_json, json.dumps(record, indent=1).encode())
        return swept

    def summary(self, shards: list[str], shard_errors: dict[str, str] | None = None) -> dict:
        total = empty_stats("*")
        total.pop("shard")
        total.pop("failure_examples", None)
        done = 0
        for shard in shards:
            path = self.path / "stats" / f"{shard}.json"
            if not (self.done(shard) and path.is_file()):
                continue
            done += 1
            stats = json.loads(path.read_text())
            for k in ("input", "kept", "rejected", "failed"):
                total[k] += stats[k]
            for k in ("rejected_by_reason", "failed_by_reason"):
                for reason, n in stats[k].items():
                    total[k][reason] = total[k].get(reason, 0) + n
            for source, counts in stats["candidates"].items():
                for k, n in counts.items():
                    total["candidates"][source][k] += n
            for source, reasons in stats["candidate_rejections_by_reason"].items():
                agg = total["candidate_rejections_by_reason"].setdefault(source, {})
                for reason, n in reasons.items():
                    agg[reason] = agg.get(reason, 0) + n
        total.update(shards=len(shards), shards_done=done, shard_errors=shard_errors or {}, output=str(self.path))
        atomic_write(self.path / "summary.json", json.dumps(total, indent=1).encode())
        return total
