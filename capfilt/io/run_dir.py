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

from capfilt.io.output import (
    LOCK_FILE,
    OWN_FOLDERS,
    OWN_SUFFIXES,
    ROOT_FILES,
    SIZES_FILE,
    TMP_MARK,
    atomic_write,
    is_own,
    join,
    list_files,
    location,
    own_shard,
    sweep_partials,
)
from capfilt.io.resume import ResumeRefused, check_resume  # noqa: F401 - ResumeRefused re-exported (cli, api)
from capfilt.records import empty_stats

PACKAGES = ("capfilt", "torch", "transformers", "open_clip_torch", "webdataset", "pyarrow", "ray", "pillow")

log = logging.getLogger(__name__)


class OutputOverlapsInput(ValueError):
    """The output location is, contains or lies inside the folder of an input shard."""


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
    ``s3://bucket/prefix`` (``path`` is the URL as given; ``fs`` and ``root`` reach it)."""

    def __init__(self, path: str | Path):
        self.fs, self.root = location(path)
        self.path = self.root if self.fs is None else os.fspath(path).rstrip("/")

    def _file(self, *parts: str):
        return join(self.root, *parts)

    def _is_file(self, path) -> bool:
        return path.is_file() if self.fs is None else self.fs.isfile(path)

    def _read(self, path) -> bytes:
        return path.read_bytes() if self.fs is None else self.fs.cat_file(path)

    def done(self, shard: str) -> bool:
        return self._is_file(self._file("_done", f"{shard}.done"))

    def prepare(self, config, models: dict, fresh: bool = False, shards=()) -> list:
        """Check (or start) the run in this directory for the input shard ids ``shards``; returns
        swept partial files. Refuses (`ForeignOutput`, before writing or deleting anything) an
        output that is not empty and not a capfilt run, or one holding files under names this run
        would write that its run.json does not record; run.json records every shard id a run of
        this output was started for, and the sweep and ``--fresh`` delete only their files."""
        if self.fs is not None:
            self.fs.invalidate_cache()  # listings cached by this process may predate other runs' writes
        record = self.check_own(shards)
        own = recorded_shards(record)
        fp = fingerprint(config, models)
        if fresh:
            self.clear(own)
            own = set()
        elif record is not None:  # refused naming each changed key, unless no shard of it completed
            check_resume(str(self.path), record, fp, config, models, self.done_count())
        if self.fs is None:
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.root, exist_ok=True)
        swept = sweep_partials(self.path, own)
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
        atomic_write(self._url("run.json"), json.dumps(record, indent=1).encode())
        return swept

    def done_count(self) -> int:
        """Shards with a completion marker here."""
        folder = self._file("_done")
        if self.fs is None:
            return sum(1 for _ in folder.glob("*.done")) if folder.is_dir() else 0
        return sum(1 for p in list_files(self.fs, folder) or [] if p.endswith(".done"))

    def check_own(self, shards=()) -> dict | None:
        """Raise ForeignOutput when capfilt may not write here: the location holds files and no
        capfilt run.json, or a run.json that is not capfilt's, or files under the names a run for
        the shard ids ``shards`` would write that its run.json does not record. Reads only; returns
        the run record (None for an empty or new location)."""
        if self.fs is not None:
            self.fs.invalidate_cache()  # listings cached by this process may predate other runs' writes
        raw = None
        try:
            raw = self._read(self._file("run.json"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
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
        bookkeeping = re.compile(
            rf"{re.escape(LOCK_FILE)}|(?:{'|'.join(map(re.escape, (*ROOT_FILES, LOCK_FILE)))})"
            rf"{re.escape(TMP_MARK)}[0-9a-f]{{8}}|\.capfilt-probe-[0-9a-f]{{8}}"
        )
        found: list[str] = []
        folders = [""]
        while folders and len(found) < limit:
            rel = folders.pop(0)
            try:
                if self.fs is None:
                    entries = [(p.name, p.is_dir() and not p.is_symlink()) for p in (self.root / rel).iterdir()]
                else:
                    listed = self.fs.ls(self._file(rel) if rel else self.root, detail=True)
                    entries = [(posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in listed]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name, is_dir in sorted(entries):
                path = f"{rel}/{name}" if rel else name
                if is_dir:
                    folders.append(path)
                elif rel or not bookkeeping.fullmatch(name):
                    found.append(path)
        return found[:limit]

    def _own_folder_files(self) -> list[str]:
        """``sub/name`` of every plain file directly in capfilt's own folders."""
        out = []
        for sub in OWN_FOLDERS:
            folder = self._file(sub)
            if self.fs is None:
                names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            else:
                names = sorted(posixpath.basename(p) for p in list_files(self.fs, folder) or [])
            out.extend(f"{sub}/{name}" for name in names)
        return out

    def _url(self, *parts: str):
        """A file of this run as atomic_write takes it (a Path, or a URL with its protocol)."""
        return join(self.root, *parts) if self.fs is None else self.fs.unstrip_protocol(join(self.root, *parts))

    def clear(self, shards=None) -> list:
        """``--fresh``: delete the files this output's runs wrote, and only those.

        That is run.json and summary.json, and inside capfilt's own folders (OWN_FOLDERS) the files
        of the shard ids ``shards`` (default: those run.json records) as capfilt names them
        (``{shard}.tar`` in shards/, ``{shard}.parquet`` in ledger/ and laion/, ``{shard}.json``
        in stats/, ``{shard}.done`` in _done/,
        and their temporary ``*.tmp-*`` names). Anything else (a file of another shard id,
        another file, a folder, a link) stays where it is, is logged, and is returned; a folder of
        capfilt's is removed only once it is empty. On an fsspec URL the same names are listed
        (``fs.ls``) and deleted; the rest is left alone.
        """
        if shards is None:
            shards = recorded_shards(self.check_own())
        if self.fs is not None:
            return self._clear_fs(shards)
        foreign: list[Path] = []
        for sub in OWN_FOLDERS:
            folder = self.path / sub
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                foreign.append(folder)
                continue
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if not entry.is_symlink() and entry.is_file() and is_own(sub, entry.name, shards):
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
            log.warning(
                "--fresh left %d file(s) in %s that capfilt did not write: %s%s", len(foreign), self.path, shown, more
            )
        return foreign

    def _clear_fs(self, shards) -> list[str]:
        fs, foreign = self.fs, []
        for sub in OWN_FOLDERS:
            folder = self._file(sub)
            files = list_files(fs, folder)
            if files is None:
                continue
            for path in sorted(files):
                if is_own(sub, posixpath.basename(path), shards):
                    fs.rm_file(path)
                else:
                    foreign.append(path)
            try:
                fs.invalidate_cache(folder)
                foreign.extend(e for e in fs.ls(folder, detail=False) if e.rstrip("/") not in files)
                fs.rmdir(folder)  # where the file system has folders of its own; an object store has none
            except (OSError, NotImplementedError):
                pass  # gone with its last object, or it still holds something capfilt did not write
        for name in ROOT_FILES:
            path = self._file(name)
            if fs.isfile(path):
                fs.rm_file(path)
            elif fs.exists(path):
                foreign.append(path)
        if foreign:
            rel = [posixpath.relpath(p, self.root) for p in foreign]
            more = f" and {len(rel) - 10} more" if len(rel) > 10 else ""
            log.warning(
                "--fresh left %d file(s) in %s that capfilt did not write: %s%s",
                len(rel),
                self.path,
                ", ".join(rel[:10]),
                more,
            )
        return [fs.unstrip_protocol(p) for p in foreign]

    def samples_in(self, shards: list[str]) -> int:
        """Input samples of those of ``shards`` that are complete (from their stats files)."""
        total = 0
        for shard in shards:
            path = self._file("stats", f"{shard}.json")
            if self.done(shard) and self._is_file(path):
                total += json.loads(self._read(path))["input"]
        return total

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
        if self.fs is not None:
            self.fs.invalidate_cache()  # the shards were committed by other processes (Ray workers)
        total = empty_stats("*")
        total.pop("shard")
        total.pop("failure_examples", None)
        done = 0
        sizes = {}  # shards/sizes.json: cleaned tar -> samples in it (webdataset / open_clip read it)
        for shard in shards:
            path = self._file("stats", f"{shard}.json")
            if not (self.done(shard) and self._is_file(path)):
                continue
            done += 1
            stats = json.loads(self._read(path))
            sizes[f"{shard}{OWN_SUFFIXES['shards']}"] = stats["kept"]
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
            atomic_write(self._url("shards", SIZES_FILE), json.dumps(sizes, indent=1).encode())
        atomic_write(self._url("summary.json"), json.dumps(total, indent=1).encode())
        return total

    def _outputs(self) -> dict:
        """What the run wrote, as globs relative to its output (the LAION table in laion_coco mode)."""
        try:
            mode = json.loads(self._read(self._file("run.json")))["config"].get("decide", {}).get("mode")
        except (OSError, ValueError, KeyError):
            mode = None
        out = {
            "cleaned shards": f"shards/*{OWN_SUFFIXES['shards']}",
            "shard sizes": f"shards/{SIZES_FILE}",
            "ledger": f"ledger/*{OWN_SUFFIXES['ledger']}",
            "stats": f"stats/*{OWN_SUFFIXES['stats']}",
        }
        if mode == "laion_coco":
            out["laion table"] = f"laion/*{OWN_SUFFIXES['laion']}"
        return out

    def _mixing(self, selected: dict) -> dict:
        """Alt-text vs synthetic in the kept samples' {key}.txt: the share the recipe asked for
        (decide.synthetic_share under select: mix, else None) and the share it came out as."""
        try:
            decide = json.loads(self._read(self._file("run.json")))["config"].get("decide", {})
        except (OSError, ValueError, KeyError):
            decide = {}
        chosen = selected["web"] + selected["synthetic"]
        return {
            "select": decide.get("select"),
            "target_synthetic_share": decide.get("synthetic_share"),
            "synthetic_share": selected["synthetic"] / chosen if chosen else None,
            "selected_web": selected["web"],
            "selected_synthetic": selected["synthetic"],
        }


# --------------------------------------------------------------------------- reading a run

# Every command that reads a run (report, calibrate, rethreshold, the loop) reads it through these,
# so a run is read from wherever `capfilt run` can write it: a local path, or the same fsspec URL
# (``s3://bucket/prefix``) that was its --output. Paths inside a run never go through pathlib.


def run_url(run: str | os.PathLike, *parts: str) -> str:
    """A file of a run as a readable location: a local path, or ``proto://…`` for a URL."""
    fs, root = location(run)
    return os.fspath(join(root, *parts)) if fs is None else fs.unstrip_protocol(join(root, *parts))


def _read_bytes(run, *parts: str) -> bytes | None:
    """A run file's bytes, or None where it does not exist."""
    fs, root = location(run)
    path = join(root, *parts)
    try:
        if fs is None:
            return Path(path).read_bytes() if Path(path).is_file() else None
        fs.invalidate_cache(posixpath.dirname(path))  # written by other processes since a listing
        return fs.cat_file(path) if fs.isfile(path) else None
    except (FileNotFoundError, NotADirectoryError):
        return None


def is_run(run: str | os.PathLike) -> bool:
    """Whether ``run`` (a path or URL) holds a run record (run.json)."""
    fs, root = location(run)
    path = join(root, "run.json")
    if fs is None:
        return Path(path).is_file()
    fs.invalidate_cache(root)
    return fs.isfile(path)


def read_run_record(run: str | os.PathLike) -> dict:
    """run.json of a run; FileNotFoundError naming the location when there is none."""
    raw = _read_bytes(run, "run.json")
    if raw is None:
        raise FileNotFoundError(f"{os.fspath(run)} is not a capfilt run (no run.json)")
    return json.loads(raw)


def read_run_json(run: str | os.PathLike, *parts: str) -> dict:
    """A JSON file of a run (``summary.json``, ``stats``, ``00000.json``), or {} where it is not."""
    raw = _read_bytes(run, *parts)
    return json.loads(raw) if raw is not None else {}


def read_stats(run: str | os.PathLike) -> list[dict]:
    """The run's stats files (one per committed shard), in shard order."""
    fs, root = location(run)
    folder = join(root, "stats")
    suffix = OWN_SUFFIXES["stats"]
    if fs is None:
        paths = sorted(Path(folder).glob(f"*{suffix}"))
        return [json.loads(p.read_bytes()) for p in paths]
    names = sorted(p for p in list_files(fs, folder) or [] if p.endswith(suffix))
    return [json.loads(fs.cat_file(p)) for p in names]


def ledger_files(run_dir: str | os.PathLike) -> list:
    """The ledger files of a run (local Paths, or paths inside the URL's file system), one per
    committed shard, in shard order."""
    fs, root = location(run_dir)
    suffix = OWN_SUFFIXES["ledger"]
    if fs is None:
        return sorted((Path(root) / "ledger").glob(f"*{suffix}"))
    return sorted(p for p in list_files(fs, join(root, "ledger")) or [] if p.endswith(suffix))


def read_ledger_table(run_dir: str | os.PathLike, shard: str | None = None):
    """The ledger of one shard (``shard``) or of the whole run, as a pyarrow Table (None when the
    run has no ledger yet)."""
    import pyarrow.parquet as pq

    fs, root = location(run_dir)
    files = [join(root, "ledger", f"{shard}{OWN_SUFFIXES['ledger']}")] if shard else ledger_files(run_dir)
    if not files:
        return None
    if fs is None:
        return pq.read_table(files)
    return pq.read_table(files if len(files) > 1 else files[0], filesystem=fs)


def read_ledger(run_dir: str | os.PathLike) -> list[dict]:
    """Every ledger row of a run (one per candidate text), shard after shard."""
    table = read_ledger_table(run_dir)
    return table.to_pylist() if table is not None else []


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
                "outside the inputs' folders"
            )
