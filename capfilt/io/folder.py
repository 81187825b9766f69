"""An output location as one folder object: a local path or any fsspec URL, every operation relative
to its root (after datatrove's ``DataFolder``, an fsspec ``DirFileSystem``).

What is local is one rule (`is_local`): a plain path, ``file://`` and ``local://``. It decides the
one property that differs between locations, how a file is committed (``OutputFolder.renames``):

* local: every file is written under a temporary name (names.tmp_name), fsynced and renamed into
  place (os.replace); a shard's completion marker is renamed in last;
* any other file system (``s3://``, ``gs://``, ``memory://``: object stores have no atomic rename):
  every file is written straight to its final name (an S3 / GCS object appears only once its
  upload completes, so never half of one), a shard's old marker is deleted before its files are
  rewritten, and the marker is written last, after the others are in place.

Either way a shard with a marker is complete, readers and resume trust only the marker, and a
shard without one is redone (a rewrite gives the same bytes). Credentials and endpoints come from
the file system's usual configuration: for S3, the AWS variables and files that botocore reads
(``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO), or fsspec's
``FSSPEC_S3_ENDPOINT_URL`` style variables (``fsspec.config``).
"""

from __future__ import annotations

import os
import posixpath
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.dirfs import DirFileSystem

from capfilt.io.names import (
    MARKERS,
    OWN_FOLDERS,
    ROOT_FILES,
    SHARD_FILES,
    is_own,
    marker,
    own_shard,
    tmp_name,
    token,
    untemp,
)

LOCAL_PROTOCOLS = (None, "file", "local")


def is_local(url: str | os.PathLike) -> bool:
    """Whether a location is on this machine's file system: a plain path, ``file://…`` or
    ``local://…`` (fsspec's two names for it). The one rule: writers, readers, the run lock and
    the Ray runner's shared-output check all ask it."""
    return isinstance(url, Path) or fsspec.core.split_protocol(os.fspath(url))[0] in LOCAL_PROTOCOLS


def local_name(url: str | os.PathLike) -> str:
    """The path of a local location (`is_local`): a plain path as written, a ``file://`` /
    ``local://`` URL's path."""
    url = os.fspath(url)
    return fsspec.core.url_to_fs(url)[1] if fsspec.core.split_protocol(url)[0] else url


def local_path(url: str | os.PathLike) -> Path:
    return Path(local_name(url))


class OutputFolder(DirFileSystem):
    """A local path or fsspec URL as a file system rooted there (paths are relative to the root)."""

    # fsspec reuses an instance made with the same arguments; a relative path ("out") would then keep
    # the root it resolved to under an earlier working directory.
    cachable = False

    def __init__(self, url: str | os.PathLike):
        fs, root = fsspec.core.url_to_fs(os.fspath(url))
        super().__init__(path=root.rstrip("/") or root, fs=fs)
        # The commit strategy, chosen here once: temporary name + fsync + rename, or a direct put.
        self.renames = is_local(url)

    # -- where

    def url_of(self, rel: str = "") -> str:
        """A file of the folder as a readable location: a local path, or ``proto://…``."""
        path = self._join(rel) if rel else self.path
        return path if self.renames else self.fs.unstrip_protocol(path)

    # -- reading

    def refresh(self) -> None:
        """Forget every listing this process cached: other processes (Ray workers, another run) may
        have written since. (The wrapped file system's whole cache: s3fs drops a path's parents,
        never what lies under it.)"""
        self.fs.invalidate_cache()

    def read(self, rel: str) -> bytes | None:
        """A file's bytes, or None where there is no such file."""
        self.invalidate_cache(posixpath.dirname(rel))  # written by other processes since a listing
        try:
            return self.cat_file(rel)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def entries(self, sub: str = "") -> list[tuple[str, str]] | None:
        """(name, kind) of what is directly in ``sub`` ("" for the root), kind one of file,
        directory, link (a symbolic link, never followed), other; None where there is no folder."""
        self.invalidate_cache(sub)  # a listing cached by this process may predate another's writes
        try:
            listed = self.ls(sub, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(listed) == 1 and listed[0]["name"].rstrip("/") == sub and listed[0]["type"] != "directory":
            return None  # ``sub`` is itself a file (a local ls lists the file)
        return [(posixpath.basename(e["name"].rstrip("/")), "link" if e.get("islink") else e["type"]) for e in listed]

    def files(self, sub: str = "") -> list[str] | None:
        """Names of the plain files directly in ``sub`` (None where there is no such folder)."""
        found = self.entries(sub)
        return None if found is None else [name for name, kind in found if kind == "file"]

    def shard_ids(self, sub: str) -> list[str]:
        """The shard ids of the committed-named files (no temporaries) in capfilt's folder ``sub``, in
        file name order."""
        ids = (own_shard(sub, name) for name in sorted(self.files(sub) or []))
        return [shard for shard, tmp in ids if shard is not None and not tmp]

    # -- writing

    def make_root(self) -> None:
        self.makedirs("", exist_ok=True)

    def make_folders(self, *subs: str) -> None:
        """Create the root and ``subs`` where files need folders; an object store has none (no request)."""
        if self.renames:
            for sub in ("", *subs):
                self.makedirs(sub, exist_ok=True)

    def open_new(self, rel: str):
        """``rel`` opened for writing; close it with `close_synced`."""
        if self.renames:  # a plain local file: its descriptor is what fsync needs
            return open(self._join(rel), "wb")
        return self.open(rel, "wb")

    def close_synced(self, f) -> None:
        """Flush and close; locally fsync first (a file of an object store commits on close)."""
        f.flush()
        if self.renames:
            os.fsync(f.fileno())
        f.close()

    def staged(self, rel: str, tok: str) -> str:
        """The name ``rel`` is written under until it is published: its temporary name, or itself."""
        return tmp_name(rel, tok) if self.renames else rel

    def publish(self, staged: str, rel: str) -> None:
        if staged != rel:
            os.replace(self._join(staged), self._join(rel))

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write a whole small file: locally under a temporary name, fsynced, renamed into place;
        elsewhere as one put of the final object, which is all-or-nothing."""
        if not self.renames:
            self.pipe_file(rel, data)
            return
        staged = self.staged(rel, token())
        f = self.open_new(staged)
        f.write(data)
        self.close_synced(f)
        self.publish(staged, rel)

    def remove(self, rel: str) -> None:
        try:
            self.rm_file(rel)
        except FileNotFoundError:
            pass

    def create_new(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only where there is none; False when one exists. Locally link(2) of a
        complete temporary file (atomic on local and NFS file systems), else O_EXCL; elsewhere a
        conditional put (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``), else check-then-put."""
        if not self.renames:
            try:
                self.pipe_file(rel, data, mode="create")
            except FileExistsError:
                return False
            except TypeError:  # a driver without mode="create": check, then put (a race window)
                if self.exists(rel):
                    return False
                self.pipe_file(rel, data)
            except OSError as err:  # S3 412 Precondition Failed, as some s3fs versions raise it
                if "precondition" in str(err).lower() or getattr(err, "errno", None) == 22:
                    return False
                raise
            return True
        path, tmp = self._join(rel), self._join(tmp_name(rel))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system: exclusive create instead
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    @contextmanager
    def serialized(self):
        """flock(2) on the root around a check-and-take-over; a no-op where it is unsupported (an
        object store has no flock)."""
        fd = None
        if self.renames:
            try:
                import fcntl

                fd = os.open(self.path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:
                    pass
            except (ImportError, OSError):
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)

    def mtime(self, rel: str) -> float | None:
        try:
            return self.modified(rel).timestamp()
        except Exception:  # noqa: BLE001 - not every file system reports it: then the record's age is unknown
            return None

    # -- completion markers (datatrove's is_rank_completed / mark_rank_as_completed / get_incomplete_ranks)

    def is_complete(self, shard: str) -> bool:
        self.invalidate_cache(MARKERS)  # a marker another process wrote since this one listed them
        return self.isfile(marker(shard))

    def start_shard(self, shard: str) -> None:
        """Before a shard's files are (re)written: where they are written in place (no rename), its
        old marker goes first, so that it never vouches for files while they are being rewritten."""
        if not self.renames:
            self.remove(marker(shard))

    def mark_complete(self, shard: str) -> None:
        self.make_folders(MARKERS)
        self.write_atomic(marker(shard), b"")

    def completed(self) -> set[str]:
        """Every shard with a marker here."""
        return set(self.shard_ids(MARKERS))

    def incomplete(self, shards) -> list[str]:
        """Those of ``shards`` without a marker, in their order."""
        done = self.completed()
        return [s for s in shards if s not in done]

    # -- what a crashed run left

    def sweep(self, shards=None) -> list[str]:
        """Remove what a crashed run of this output left behind: only files of ``shards`` (the shard
        ids its run.json records writing; None: every name capfilt gives, for a run.json that records
        none) and temporaries of the root files. Returns them (as `url_of`).

        Local: temporary files (``{name}.tmp-XXXXXXXX`` of those files), never a user's file that
        happens to contain .tmp-. Elsewhere (no temporary names; files go straight to their final
        names): also a shard's own files (``shards/{id}.tar``, ``ledger/{id}.parquet``, …) where its
        marker is absent, since they are the partial outputs of a shard that never committed."""
        shards = None if shards is None else set(shards)
        done = set() if self.renames else self.completed()
        swept = []
        for sub in ("", *OWN_FOLDERS):
            for name in self.files(sub) or []:
                base, tmp = untemp(name)
                if not sub:
                    stale = tmp and base in ROOT_FILES
                else:  # a marker is never stale; a shard's other files are until its marker is there
                    unmarked = not self.renames and sub in SHARD_FILES and own_shard(sub, name)[0] not in done
                    stale = is_own(sub, name, shards) and (tmp or unmarked)
                if stale:
                    rel = f"{sub}/{name}" if sub else name
                    self.remove(rel)
                    swept.append(self.url_of(rel))
        return swept


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """`OutputFolder.write_atomic` of one file named by its full path or URL."""
    url = os.fspath(path).rstrip("/")
    parent, name = url.rsplit("/", 1) if "/" in url else (".", url)
    OutputFolder(parent or "/").write_atomic(name, data)


def read_file(path: str | os.PathLike) -> bytes | None:
    """A file's bytes by its full path or URL, or None where there is none."""
    url = os.fspath(path).rstrip("/")
    parent, name = url.rsplit("/", 1) if "/" in url else (".", url)
    return OutputFolder(parent or "/").read(name)
