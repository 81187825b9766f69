"""Part files: how a shard's outputs are built by many workers and committed by one task.

Under the Ray runner a shard's batches are decided by whichever model actors Ray picks, in any
order, possibly more than once (retries). Each decided batch is *rendered* where it was decided
(`shard_writer.render`: the kept samples' tar members, the ledger and LAION rows) and stored as one
part file, ``_parts/{shard}.{part:06d}.part`` in the output location, under a name fixed by its
address, so a retried batch writes the same bytes to the same name. When every part of a shard
is there, one commit task (`commit_parts`) appends them in part order with the local runner's
`ShardWriter` (same row groups, same tar, same stats: the same bytes), writes the marker last,
and only then deletes the parts. Nothing but part numbers and counts goes through the driver.

A part file is an uncompressed tar of two members, read by name and never extracted:
``members.tar`` (the batch's tar members, ready to append) and ``rows.json`` (ledger rows, LAION
rows, failure examples; JSON keeps every float and string exactly). It is written whole:
temporary name and rename on a local path, one PUT on an object store.

Exactly once, with retries anywhere:

* a part is rewritten with identical bytes, so a duplicate write is harmless;
* `commit_parts` is idempotent: a shard whose marker is already there is not rewritten (a retry
  of a task that died after its marker only cleans up); a task that dies before the marker
  leaves every part in place, and its retry commits from them;
* parts are deleted only after the marker, and a run sweeps stale parts when it starts
  (`output.sweep_partials`: they are the half-done work of a run that stopped).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

from capfilt.io.output import PARTS, atomic_write, join, location, shard_writer
from capfilt.io.shard_writer import Rendered, tar_members

PART_NAME = re.compile(r"^(?P<shard>.+)\.(?P<part>\d{6})\.part$", re.DOTALL)


def part_name(shard: str, part: int) -> str:
    return f"{shard}.{part:06d}.part"


def _url(out: str | os.PathLike, shard: str, part: int):
    fs, root = location(out)
    path = join(root, PARTS, part_name(shard, part))
    return path if fs is None else fs.unstrip_protocol(path)


def write_part(out: str | os.PathLike, shard: str, part: int, rendered: Rendered) -> int:
    """Store one rendered batch as its part file; returns the file's size in bytes."""
    rows = {"ledger": rendered.ledger, "laion": rendered.laion, "details": rendered.details}
    data = tar_members([("members.tar", rendered.members), ("rows.json", json.dumps(rows).encode())])
    data += tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # end of archive
    fs, root = location(out)
    if fs is None:
        (root / PARTS).mkdir(parents=True, exist_ok=True)
    atomic_write(_url(out, shard, part), data)
    return len(data)


def read_part(out: str | os.PathLike, shard: str, part: int) -> Rendered:
    fs, _ = location(out)
    url = _url(out, shard, part)
    data = url.read_bytes() if fs is None else fs.cat_file(url)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.extractfile("members.tar").read()
        rows = json.loads(tar.extractfile("rows.json").read())
    return Rendered(members, rows["ledger"], rows["laion"], rows["details"])


class LockLost(RuntimeError):
    """Another run holds the output's lock now: this commit stops before its marker."""


def _still_owner(out: str | os.PathLike, owner: str):
    """A check run just before the marker: the run that started this commit still holds the lock."""
    from capfilt.io.run_lock import RunLock

    def check() -> None:
        holder = RunLock(out).holder() or {}
        if holder.get("token") != owner:
            raise LockLost(
                f"{out}: the run that started this commit no longer holds the output's lock "
                f"(now {holder.get('host', '?')} pid {holder.get('pid', '?')}); no marker written"
            )

    return check


def commit_parts(
    out: str | os.PathLike, shard: str, parts: list[int], *, laion: bool, source: str | None, owner: str | None = None
) -> dict:
    """Commit a shard from its part files (``parts``: the part numbers holding samples, in order;
    none for an empty shard), marker last, then delete the parts. Returns the shard's stats.

    ``owner``: the lock token of the run that started this commit. A worker can outlive a killed
    driver; once a rerun has taken the lock over (and swept this shard's files), this commit's
    marker must not vouch for them: it is written only while ``owner`` still holds the lock, and
    a commit that lost the lock deletes nothing (the files under final names are the rerun's now)."""
    fs, root = location(out)
    done = join(root, "_done", f"{shard}.done")
    stats_file = join(root, "stats", f"{shard}.json")
    if done.is_file() if fs is None else fs.isfile(done):  # a retry of a commit that got this far
        stats = json.loads(stats_file.read_bytes() if fs is None else fs.cat_file(stats_file))
    else:
        writer = shard_writer(out, shard, laion=laion, source=source)
        try:
            for part in parts:
                writer.add_rendered(read_part(out, shard, part))
            stats = writer.commit(before_marker=_still_owner(out, owner) if owner else None)
        except LockLost:
            raise
        except BaseException:
            writer.abort()
            raise
    remove_parts(out, shard, parts)
    return stats


def remove_parts(out: str | os.PathLike, shard: str, parts: list[int]) -> None:
    fs, root = location(out)
    for part in parts:
        path = join(root, PARTS, part_name(shard, part))
        if fs is None:
            path.unlink(missing_ok=True)
            continue
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
