"""The output directory of a run: run.json, resume checks, completed shards, the run summary.

Also what keeps a run from harming anything else: ``--fresh`` deletes only what capfilt wrote
(``RunDir.clear``), an output holding files capfilt did not write is refused (``check_own``), the
output must lie apart from the input shards' folders (apart.py), and one run at a time holds the
output location (``RunLock``, in run_lock.py). Every file operation goes through the run's
`OutputFolder` (folder.py), so nothing here depends on what kind of location it is.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from capfilt.config import laion_mode
from capfilt.io.apart import OutputOverlapsInput, check_apart  # noqa: F401 - re-exported (its home: apart.py)
from capfilt.io.folder import OutputFolder, is_local, local_path
from capfilt.io.names import (
    BOOKKEEPING,
    OWN_FOLDERS,
    ROOT_FILES,
    RUN_FILE,
    SIZES_FILE,
    SUMMARY_FILE,
    is_own,
    own_shard,
    shard_file,
)
from capfilt.io.resume import ResumeRefused, check_resume  # noqa: F401 - ResumeRefused re-exported (cli, api)
from capfilt.io.run_read import (  # noqa: F401 - re-exported: the readers' home is run_read.py
    is_run,
    ledger_files,
    read_ledger,
    read_ledger_table,
    read_run_json,
    read_run_record,
    read_stats,
    run_url,
)
from capfilt.records import empty_stats

PACKAGES = ("capfilt", "torch", "transformers", "open_clip_torch", "webdataset", "pyarrow", "ray", "pillow")

log = logging.getLogger(__name__)


class ForeignOutput(ValueError):
    """The output location holds files capfilt did not write: it is not empty and holds no capfilt
    run, or it holds files under names this run would write that its run.json does not record."""


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
    """A run's output location: a local path (``path`` is a Path) or an fsspec URL such as
    ``s3://bucket/prefix`` (``path`` is the URL as given); ``folder`` reaches it."""

    def __init__(self, path: str | Path):
        self.folder = OutputFolder(path)
        self.path = local_path(path) if is_local(path) else os.fspath(path).rstrip("/")

    def done(self, shard: str) -> bool:
        return self.folder.is_complete(shard)

    def prepare(self, config, models: dict, fresh: bool = False, shards=()) -> list:
        """Check (or start) the run in this directory for the input shard ids ``shards``; returns
        swept partial files. Refuses (`ForeignOutput`, before writing or deleting anything) an
        output that is not empty and not a capfilt run, or one holding files under names this run
        would write that its run.json does not record; run.json records every shard id a run of
        this output was started for, and the sweep and ``--fresh`` delete only their files."""
        record = self.check_own(shards)
        own = recorded_shards(record)
        fp = fingerprint(config, models)
        if fresh:
            self.clear(own)
            own = set()
        elif record is not None:  # refused naming each changed key, unless no shard of it completed
            check_resume(str(self.path), record, fp, config, models, self.done_count())
        self.folder.make_root()
        swept = self.folder.sweep(own)
        record = {
            "fingerprint": fp,
            "config": config.model_dump(mode="json"),
            "models": models,
            "versions": package_versions(),
            "host": platform.node(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # Every shard a run of this output was started for: what the sweep and --fresh may delete.
            RECORDED: sorted((own or set()) | set(shards)),
        }
        self.folder.write_atomic(RUN_FILE, json.dumps(record, indent=1).encode())
        return swept

    def done_count(self) -> int:
        """Shards with a completion marker here."""
        return len(self.folder.completed())

    def check_own(self, shards=()) -> dict | None:
        """Raise ForeignOutput when capfilt may not write here: the location holds files and no
        capfilt run.json, or a run.json that is not capfilt's, or files under the names a run for
        the shard ids ``shards`` would write that its run.json does not record. Reads only; returns
        the run record (None for an empty or new location)."""
        self.folder.refresh()  # listings cached by this process may predate other runs' writes
        raw = self.folder.read(RUN_FILE)
        if raw is None:
            found = self._contents()
            if found:
                raise ForeignOutput(
                    f"output {self.path} is not empty and holds no capfilt run (no run.json): "
                    f"{', '.join(found[:5])}{', ...' if len(found) > 5 else ''}. "
                    "capfilt writes and deletes only what its own runs wrote; choose an empty or new --output"
                )
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and "fingerprint" in record and "config" in record):
            raise ForeignOutput(
                f"output {self.path} has a run.json that is not a capfilt run record, so capfilt cannot tell "
                "what there it wrote; choose an empty or new --output"
            )
        own = recorded_shards(record)
        if own is not None and (new := set(shards) - own):
            clash = [rel for rel in self._own_folder_files() if own_shard(*rel.split("/", 1))[0] in new]
            if clash:
                raise ForeignOutput(
                    f"output {self.path} holds {_listing(clash)} under names this run would write for its "
                    "shards, but its run.json does not record capfilt writing them; move them away or "
                    "choose another --output"
                )
        return record

    def _contents(self, limit: int = 6) -> list[str]:
        """Up to ``limit`` paths (relative) of what the location holds besides capfilt's lock and
        its temporaries: files, links, anything not a folder; a folder only through what is in it.
        Folder by folder, stopping at ``limit``: a refusal never walks a whole tree or bucket."""
        found: list[str] = []
        folders = [""]
        while folders and len(found) < limit:
            rel = folders.pop(0)
            for name, kind in sorted(self.folder.entries(rel) or []):
                path = f"{rel}/{name}" if rel else name
                if kind == "directory":
                    folders.append(path)
                elif rel or not BOOKKEEPING.fullmatch(name):
                    found.append(path)
        return found[:limit]

    def _own_folder_files(self) -> list[str]:
        """``sub/name`` of every plain file directly in capfilt's own folders."""
        return [f"{sub}/{name}" for sub in OWN_FOLDERS for name in sorted(self.folder.files(sub) or [])]

    def clear(self, shards=None) -> list:
        """``--fresh``: delete the files this output's runs wrote, and only those.

        That is run.json and summary.json, and inside capfilt's own folders (OWN_FOLDERS) the files
        of the shard ids ``shards`` (default: those run.json records) as capfilt names them
        (``{shard}.tar`` in shards/, ``{shard}.parquet`` in ledger/ and laion/, ``{shard}.json``
        in stats/, ``{shard}.done`` in _done/, and their temporary ``*.tmp-*`` names). Anything
        else (a file of another shard id, another file, a folder, a link) stays where it is, is
        logged, and is returned (as locations: a path, or a URL with its protocol); a folder of
        capfilt's is removed only once it is empty (where the file system has folders).
        """
        if shards is None:
            shards = recorded_shards(self.check_own())
        folder, foreign = self.folder, []
        listed: dict[str, dict[str, str]] = {}  # folder -> {name: kind} of what is directly in it

        def kind_of(rel: str) -> str | None:
            parent, _, name = rel.rpartition("/")
            if parent not in listed:
                listed[parent] = dict(folder.entries(parent) or [])
            return listed[parent].get(name)

        for sub in OWN_FOLDERS:
            kind = kind_of(sub)
            if kind is None:
                continue
            if kind != "directory":  # a link or a file where capfilt's folder would be
                foreign.append(sub)
                continue
            for name, kind in sorted(folder.entries(sub) or []):
                if kind == "file" and is_own(sub, name, shards):
                    folder.remove(f"{sub}/{name}")
                else:
                    foreign.append(f"{sub}/{name}")
            try:
                folder.rmdir(sub)  # where the file system has folders of its own; an object store has none
            except (OSError, NotImplementedError):
                pass  # gone with its last object, or it still holds something capfilt did not write
        for name in ROOT_FILES:
            kind = kind_of(name)
            if kind == "file":
                folder.remove(name)
            elif kind is not None:
                foreign.append(name)
        if foreign:
            more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
            log.warning(
                "--fresh left %d file(s) in %s that capfilt did not write: %s%s",
                len(foreign),
                self.path,
                ", ".join(foreign[:10]),
                more,
            )
        return [folder.url_of(rel) for rel in foreign]

    def samples_in(self, shards: list[str]) -> int:
        """Input samples of those of ``shards`` that are complete (from their stats files)."""
        return sum(stats["input"] for stats in map(self._stats, shards) if stats is not None)

    def _stats(self, shard: str) -> dict | None:
        """A complete shard's stats (None for a shard without its marker or its stats file)."""
        raw = self.folder.read(shard_file("stats", shard)) if self.done(shard) else None
        return None if raw is None else json.loads(raw)

    def summary(
        self,
        shards: list[str],
        shard_errors: dict[str, str] | None = None,
        missing_source_shards: list[str] | None = None,
    ) -> dict:
        """Totals over the completed ``shards``, written to summary.json.

        ``missing_source_shards`` (a derived run, e.g. rethreshold): the source run's shards it
        could not cover; the summary then says whether it is ``partial`` and names them.
        """
        self.folder.refresh()  # the shards were committed by other processes (Ray workers)
        total = empty_stats("*")
        total.pop("shard")
        total.pop("failure_examples", None)
        done = 0
        sizes = {}  # shards/sizes.json: cleaned tar -> samples in it (webdataset / open_clip read it)
        for shard in shards:
            stats = self._stats(shard)
            if stats is None:
                continue
            done += 1
            sizes[shard_file("shards", shard).split("/", 1)[1]] = stats["kept"]
            for k in ("input", "kept", "rejected", "failed"):
                total[k] += stats[k]
            total["upstream_failed"] += stats.get("upstream_failed", 0)  # absent in stats of older runs
            for k in (
                "rejected_by_reason",
                "failed_by_reason",
                "upstream_failed_by_reason",
                "upstream_failed_by_status",
            ):
                for reason, n in stats.get(k, {}).items():
                    total[k][reason] = total[k].get(reason, 0) + n
            for source, counts in stats["candidates"].items():
                for k, n in counts.items():
                    total["candidates"][source][k] += n
            for source, n in stats.get("selected", {}).items():  # absent in stats of older runs
                total["selected"][source] += n
            for source, reasons in stats["candidate_rejections_by_reason"].items():
                agg = total["candidate_rejections_by_reason"].setdefault(source, {})
                for reason, n in reasons.items():
                    agg[reason] = agg.get(reason, 0) + n
        total.update(shards=len(shards), shards_done=done, shard_errors=shard_errors or {}, output=str(self.path))
        total["mixing"] = self._mixing(total["selected"])
        if missing_source_shards is not None:
            total.update(partial=bool(missing_source_shards), missing_source_shards=list(missing_source_shards))
        total["outputs"] = self._outputs()
        if sizes:
            # open_clip's `get_dataset_size` (and webdataset's) read this beside the shards, so
            # training on them needs no --train-num-samples; only committed shards are listed.
            self.folder.write_atomic(f"shards/{SIZES_FILE}", json.dumps(sizes, indent=1).encode())
        self.folder.write_atomic(SUMMARY_FILE, json.dumps(total, indent=1).encode())
        return total

    def _outputs(self) -> dict:
        """What the run wrote, as globs relative to its output (the LAION table in laion_coco mode)."""
        out = {
            "cleaned shards": shard_file("shards", "*"),
            "shard sizes": f"shards/{SIZES_FILE}",
            "ledger": shard_file("ledger", "*"),
            "stats": shard_file("stats", "*"),
        }
        if laion_mode(self._decide()):
            out["laion table"] = shard_file("laion", "*")
        return out

    def _decide(self) -> dict:
        """The decide section of this run's run.json ({} where it cannot be read)."""
        try:
            return json.loads(self.folder.read(RUN_FILE) or b"{}")["config"].get("decide", {})
        except (OSError, ValueError, KeyError, AttributeError):
            return {}

    def _mixing(self, selected: dict) -> dict:
        """Alt-text vs synthetic in the kept samples' {key}.txt: the share the recipe asked for
        (decide.synthetic_share under select: mix, else None) and the share it came out as."""
        decide = self._decide()
        chosen = selected["web"] + selected["synthetic"]
        return {
            "select": decide.get("select"),
            "target_synthetic_share": decide.get("synthetic_share"),
            "synthetic_share": selected["synthetic"] / chosen if chosen else None,
            "selected_web": selected["web"],
            "selected_synthetic": selected["synthetic"],
        }


# --------------------------------------------------------------------------- what capfilt wrote

RECORDED = "shards"  # run.json: the shard ids its output's runs were started for


def recorded_shards(record: dict | None) -> set[str] | None:
    """The shard ids a run.json records (empty for no run.json); None for a run.json of a capfilt
    that did not record them, whose every file named as capfilt names them counts as its own."""
    if record is None:
        return set()
    shards = record.get(RECORDED)
    return None if shards is None else {str(s) for s in shards}


def _listing(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
