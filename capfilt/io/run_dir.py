"""The output directory of a run: run.json, resume checks, completed shards, the run summary.

Also what keeps a run from harming anything else: the output must lie apart from the input
shards' folders (``check_apart``), ``--fresh`` deletes only what capfilt wrote (``RunDir.clear``),
and one run at a time holds the output location (``RunLock``, in run_lock.py).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import posixpath
import re
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import fsspec
from fsspec.registry import known_implementations

from capfilt.io.output import SUBDIRS, TMP_MARK, atomic_write, sweep_partials
from capfilt.records import empty_stats

PACKAGES = ("capfilt", "torch", "transformers", "open_clip_torch", "webdataset", "pyarrow", "ray", "pillow")

log = logging.getLogger("capfilt")


class ResumeRefused(RuntimeError):
    """The output directory holds a run with a different config or models."""


class OutputOverlapsInput(ValueError):
    """The output location is, contains or lies inside the folder of an input shard."""


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
            self.clear()
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

    def clear(self) -> list[Path]:
        """``--fresh``: delete the files capfilt wrote here, and only those.

        That is run.json and summary.json, and inside capfilt's own folders (SUBDIRS) the files
        named as capfilt names them (``{shard}.tar`` in shards/, ``{shard}.parquet`` in ledger/
        and laion/, ``{shard}.json`` in stats/, ``{shard}.done`` in _done/, and their temporary
        ``*.tmp-*`` names). Anything else (another file, a folder, a link) stays where it is, is
        logged, and is returned; a folder of capfilt's is removed only once it is empty.
        """
        foreign: list[Path] = []
        for sub in SUBDIRS:
            folder = self.path / sub
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                foreign.append(folder)
                continue
            if not folder.is_dir():
                continue
            own = _own_name_pattern(sub)
            for entry in sorted(folder.iterdir()):
                if not entry.is_symlink() and entry.is_file() and own.fullmatch(entry.name):
                    entry.unlink(missing_ok=True)
                else:
                    foreign.append(entry)
            try:
                folder.rmdir()
            except OSError:
                pass  # it still holds files capfilt did not write
        for name in ROOT_FILES:
            path = self.path / name
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
            elif path.exists() or path.is_symlink():
                foreign.append(path)
        if foreign:
            shown = ", ".join(str(p.relative_to(self.path)) for p in foreign[:10])
            more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
            log.warning("--fresh left %d file(s) in %s that capfilt did not write: %s%s",
                        len(foreign), self.path, shown, more)
        return foreign

    def summary(self, shards: list[str], shard_errors: dict[str, str] | None = None,
                missing_source_shards: list[str] | None = None) -> dict:
        """Totals over the completed ``shards``, written to summary.json.

        ``missing_source_shards`` (a derived run, e.g. rethreshold): the source run's shards it
        could not cover; the summary then says whether it is ``partial`` and names them.
        """
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
            total["upstream_failed"] += stats.get("upstream_failed", 0)  # absent in stats of older runs
            for k in ("rejected_by_reason", "failed_by_reason", "upstream_failed_by_reason", "upstream_failed_by_status"):
                for reason, n in stats.get(k, {}).items():
                    total[k][reason] = total[k].get(reason, 0) + n
            for source, counts in stats["candidates"].items():
                for k, n in counts.items():
                    total["candidates"][source][k] += n
            for source, reasons in stats["candidate_rejections_by_reason"].items():
                agg = total["candidate_rejections_by_reason"].setdefault(source, {})
                for reason, n in reasons.items():
                    agg[reason] = agg.get(reason, 0) + n
        total.update(shards=len(shards), shards_done=done, shard_errors=shard_errors or {}, output=str(self.path))
        if missing_source_shards is not None:
            total.update(partial=bool(missing_source_shards), missing_source_shards=list(missing_source_shards))
        atomic_write(self.path / "summary.json", json.dumps(total, indent=1).encode())
        return total


# --------------------------------------------------------------------------- what capfilt wrote

ROOT_FILES = ("run.json", "summary.json")
# The name of every file capfilt writes in each of its folders: "{shard}{suffix}".
OWN_SUFFIXES = {"shards": ".tar", "ledger": ".parquet", "stats": ".json", "laion": ".parquet", "_done": ".done"}


def _own_name_pattern(sub: str) -> re.Pattern:
    """Names capfilt writes in its folder ``sub``, final or temporary (atomic_write's ``.tmp-*``)."""
    suffixes = [OWN_SUFFIXES[sub]] if sub in OWN_SUFFIXES else sorted(set(OWN_SUFFIXES.values()))
    alternatives = "|".join(re.escape(x) for x in suffixes)
    return re.compile(rf".+(?:{alternatives})(?:{re.escape(TMP_MARK)}[0-9a-f]+)?", re.DOTALL)


# --------------------------------------------------------------------------- output apart from inputs


def _locations(url: str | os.PathLike) -> set[tuple[str, str]]:
    """Normalized (protocol, absolute path) of a local path or fsspec URL.

    A local path gives both its absolute form and its form with every link resolved, so a link
    cannot hide that two paths name the same folder. An fsspec URL is normalized by its file
    system class (``s3a://`` is ``s3://``), without any request to the store.
    """
    url = os.fspath(url)
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return {("file", os.path.abspath(path)), ("file", os.path.realpath(path))}
    try:
        fs, path = fsspec.core.url_to_fs(url)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    except Exception:  # noqa: BLE001 - no backend installed here: compare the URL as written
        pass
    # Aliases of one store (s3 / s3a, gs / gcs) name the same class in fsspec's registry.
    kind = known_implementations.get(protocol, {}).get("class", protocol)
    return {(kind, posixpath.normpath("/" + path.strip("/")))}


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _input_folders(inputs: list[str]) -> dict[tuple[str, str], str]:
    """Normalized folders of the input shards -> one shard in each (for the message)."""
    folders: dict[tuple[str, str], str] = {}
    parents: dict[str, str] = {}
    for url in map(os.fspath, inputs):
        if "://" in url:
            proto, _, rest = url.partition("://")
            parents.setdefault(f"{proto}://{rest.rstrip('/').rpartition('/')[0]}", url)
        else:
            parents.setdefault(os.path.dirname(os.path.abspath(url)), url)
            if os.path.islink(url):  # a linked shard: the folder of what it points to counts too
                folders.setdefault(("file", os.path.dirname(os.path.realpath(url))), url)
    for parent, url in parents.items():
        for loc in _locations(parent):
            folders.setdefault(loc, url)
    return folders


def check_apart(output: str | os.PathLike, inputs: list[str]) -> None:
    """Raise OutputOverlapsInput when the output location is, contains or lies inside the folder
    of an input shard: capfilt writes there and ``--fresh`` deletes there. Touches nothing."""
    outs = _locations(output)
    for (proto, folder), url in _input_folders(inputs).items():
        for oproto, opath in outs:
            if proto != oproto:
                continue
            if opath == folder:
                relation = "is"
            elif _inside(opath, folder):
                relation = "lies inside"
            elif _inside(folder, opath):
                relation = "contains"
            else:
                continue
            raise OutputOverlapsInput(
                f"output {os.fspath(output)} {relation} the folder of the input shard {url} ({folder}); "
                "capfilt writes into its output and --fresh deletes there, so choose an output "
                "outside the inputs' folders")
