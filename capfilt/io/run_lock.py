"""One run at a time per output location: the `run.lock` record, its heartbeat and takeover.

A second `capfilt run` on the same output refuses and names the first (host, pid, start, command);
a lock left by a killed run (its process gone, its pid reused, the machine rebooted, or, for an
owner on another host, a heartbeat older than the timeout) is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from capfilt.io.folder import OutputFolder, is_local, local_path
from capfilt.io.names import LOCK_FILE

log = logging.getLogger(__name__)


class OutputLocked(ValueError):
    """Another capfilt run holds the output location."""


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None elsewhere."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _identity() -> dict:
    """Who holds a lock: enough to tell, on the same machine, whether that process still runs."""
    pidns = None
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    stat = _proc_stat(os.getpid())
    return {
        "host": platform.node(),
        "pid": os.getpid(),
        "pid_start": stat[1] if stat else None,
        "pidns": pidns,
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "command": " ".join(sys.argv)[:300],
    }


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return not (stat and stat[0] in ("Z", "X"))  # a zombie has ended; only its parent has not reaped it


class RunLock:
    """One capfilt run at a time per output location (DESIGN §3), released when the run ends.

    The lock is a small JSON record naming its owner (host, pid, start time, command, and, on
    Linux, the process start tick, pid namespace and boot id) in ``OUT/run.lock``. It is created
    only where none exists (link(2) of a complete temporary file: atomic on local and NFS file
    systems), refreshed every ``heartbeat_s`` by a daemon thread, and deleted by its owner on
    release (also on an error or Ctrl-C, as a context manager). A record is stale, and is taken
    over with a warning, when on this machine its process has ended (or its pid now belongs to
    another process, or the machine rebooted since), or, for an owner elsewhere whose pid cannot be
    checked, when its heartbeat is older than ``stale_s``. A live owner makes ``acquire`` raise
    OutputLocked naming it. Checks and take-overs are serialized by flock(2) on the folder where
    the file system supports it.

    On an fsspec URL (an object store: ``s3://``, ``gs://``, ``memory://``) the same record is an
    object, ``OUT/run.lock``. It is created with a conditional put (``pipe_file(mode="create")``:
    S3 ``If-None-Match: *``, which AWS S3 and moto honour, as do recent MinIO releases; GCS
    ``ifGenerationMatch=0``), then read back: the run holds
    the lock only if the object carries its token. Heartbeat overwrites it; release deletes it.
    Race windows, where the store or its fsspec driver gives no conditional operation: (1) a store
    that ignores If-None-Match lets two runs that start within one put of each other both write;
    the read-back makes the later writer win and the earlier one usually refuse, but a run that
    read back before the other's put lands goes on too (its heartbeat then logs the takeover);
    (2) a stale record is taken over by delete + conditional create, so two runs taking over the
    same stale record at the same moment are told apart only by that create. Local file systems
    have neither window (link(2) and flock(2)).
    """

    def __init__(self, folder: str | os.PathLike, heartbeat_s: float = 30.0, stale_s: float = 300.0):
        self.out = OutputFolder(folder)
        self.folder = local_path(folder) if is_local(folder) else os.fspath(folder).rstrip("/")  # as shown
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- holding

    def acquire(self) -> None:
        self.out.make_root()
        now = time.time()
        self.record = {
            **_identity(),
            "token": self.token,
            "heartbeat": now,
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        }
        with self.out.serialized():
            for _ in range(5):
                if self._create():
                    break
                holder = self.holder()
                if holder is None:
                    continue  # released in between: try again
                why = self.stale_reason(holder)
                if why is None:
                    raise OutputLocked(
                        f"{self.folder} is in use by another capfilt run ({describe_holder(holder)}); "
                        f"wait for it to end or use another output (if that run is gone, delete {self._shown()})"
                    )
                log.warning(
                    "%s: taking over the stale lock of an earlier run (%s): %s",
                    self.folder,
                    describe_holder(holder),
                    why,
                )
                self._delete()
            else:
                raise OutputLocked(f"could not create the lock {self._shown()}: it keeps reappearing")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="capfilt-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        current = self.holder()
        if current is not None and current.get("token") == self.token:
            self._delete()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self.holder()
                if current is None or current.get("token") != self.token:
                    log.error(
                        "%s: the run lock was taken over by %s; this run no longer holds it",
                        self.folder,
                        describe_holder(current) if current else "nobody (it was deleted)",
                    )
                    return
                self.record["heartbeat"] = time.time()
                self.out.write_atomic(LOCK_FILE, json.dumps(self.record, indent=1).encode())
            except OSError as err:  # a missed beat is retried at the next one
                log.debug("run lock heartbeat failed: %s", err)

    # -- looking at it

    def holder(self) -> dict | None:
        """The record of the lock's owner; None when there is no lock. An unreadable record reads
        as ``{"unreadable": ...}`` with the file's modification time as its heartbeat."""
        raw = self.out.read(LOCK_FILE)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return record
        except ValueError as err:
            return {"unreadable": str(err)[:100], "heartbeat": self.out.mtime(LOCK_FILE)}

    def stale_reason(self, holder: dict) -> str | None:
        """Why the lock ``holder`` is stale, or None while its run may still be going."""
        me = _identity()
        pid = holder.get("pid")
        if holder.get("host") == me["host"] and isinstance(pid, int):
            if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
                return f"{me['host']} has rebooted since it was taken"
            if holder.get("pidns") == me["pidns"]:
                if not _pid_alive(pid):
                    return f"process {pid} is not running on {me['host']}"
                stat = _proc_stat(pid)
                if holder.get("pid_start") and stat and stat[1] != holder["pid_start"]:
                    return f"pid {pid} now belongs to another process"
                return None
        try:
            age = time.time() - float(holder.get("heartbeat"))
        except (TypeError, ValueError):
            age = float("inf")
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (timeout {self.stale_s:.0f} s)"
        return None

    # -- low level

    def _shown(self) -> str:
        """The lock file as a path or URL (with its protocol)."""
        return self.out.url_of(LOCK_FILE)

    def _delete(self) -> None:
        self.out.remove(LOCK_FILE)

    def _create(self) -> bool:
        """Write our record as the lock if there is none; False when one exists. Where the create
        is not atomic (an object store), the record is read back: we hold the lock only if it
        carries our token."""
        if not self.out.create_new(LOCK_FILE, json.dumps(self.record, indent=1).encode()):
            return False
        current = self.holder()
        return current is not None and current.get("token") == self.token


def describe_holder(holder: dict) -> str:
    if "unreadable" in holder:
        return f"an unreadable lock record: {holder['unreadable']}"
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}", f"started {holder.get('started')}"]
    try:
        parts.append(f"last heartbeat {time.time() - float(holder['heartbeat']):.0f} s ago")
    except (KeyError, TypeError, ValueError):
        pass
    if holder.get("command"):
        parts.append(f"command {holder['command']!r}")
    return ", ".join(parts)
