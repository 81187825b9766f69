"""Streaming raw samples out of WebDataset tars (and their img2dataset sidecars).

This module deals only in bytes: decoding images and judging texts happen later. Its promise
(DESIGN §6) is that a damaged shard never crashes a job and never loses a key silently:
duplicate keys and truncated tars come out as samples carrying a ``failure`` reason, so the
caller can count them. Only a shard that cannot be read as a tar at all raises. Naming shards
lives in io/shard_urls.py, the member-name and key rules in io/sample_keys.py.
"""

from __future__ import annotations

import json
import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import fsspec
import pyarrow.parquet as pq

from capfilt.config import MAX_TEXT_BYTES
from capfilt.io.sample_keys import (
    MAX_NAME_BYTES,
    check_member_name,
    key_warning,
    printable_key,
    split_group,
    split_name,
    unsafe_name_reason,
    unsafe_sample_note,
)
from capfilt.io.shard_urls import expand_shards, shard_id, sidecar_url
from capfilt.records import Reason

# Shard naming and the key rules lived here before the split: importers keep
# `from capfilt.io.shards import ...`; each name is defined once, in the module it comes from.
__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_NAME_BYTES",
    "RawSample",
    "ShardReadError",
    "Span",
    "check_member_name",
    "expand_shards",
    "image_ext",
    "image_member",
    "key_warning",
    "read_shard",
    "read_sidecar",
    "shard_id",
    "sidecar_url",
    "split_group",
    "split_name",
    "text_of",
    "unsafe_name_reason",
    "url_of",
]

log = logging.getLogger(__name__)


# In order of preference when a sample carries more than one image member.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


# Errors that mean "the byte stream ended or went bad here". OSError is included because a
# short or corrupt compressed stream surfaces as one; its message goes into the sample detail.
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class ShardReadError(tarfile.ReadError):
    """The shard cannot be read as a tar at all: not a tar, empty, or broken in its first header."""


class Span(NamedTuple):
    """Where a member's bytes lie in an uncompressed tar file: read them with seek + read."""

    offset: int
    size: int


@dataclass
class RawSample:
    shard: str
    key: str
    occurrence: int  # 0 for the first copy of a key in this shard, 1, 2... for later copies
    members: dict[str, bytes]  # full extension after the key, lower-cased ("jpg", "x.jpg") -> bytes
    failure: str | None = None  # a records.Reason when the reader itself knows the sample is broken
    detail: str = ""
    sidecar: dict | None = None  # this key's row of the shard's parquet sidecar, if any
    # Members left in the tar (read_shard's `load` said no): extension as in `members` -> its Span.
    spans: dict[str, Span] = field(default_factory=dict)


# --------------------------------------------------------------------------- sidecars


def read_sidecar(url: str) -> dict[str, dict]:
    """Rows of the shard's parquet sidecar by key; {} when there is none or it is unreadable."""
    side = sidecar_url(url)
    try:
        fs, path = fsspec.core.url_to_fs(side)
        if not fs.exists(path):
            return {}
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 - a bad sidecar only costs us metadata, never the shard
        log.warning("ignoring unreadable parquet sidecar %s: %s", side, e)
        return {}
    if "key" not in table.column_names:
        log.warning("ignoring parquet sidecar %s: it has no 'key' column", side)
        return {}
    rows: dict[str, dict] = {}
    for row in table.to_pylist():
        if row.get("key") is not None:
            rows.setdefault(str(row["key"]), row)
    return rows


# --------------------------------------------------------------------------- reading tars


def _end_aware(stops: list[tarfile.HeaderError]) -> type[tarfile.TarInfo]:
    """A TarInfo class (tarfile.open's ``tarinfo=``) that appends to ``stops`` why a header failed.

    tarfile stops iterating *silently* when a header after the first is missing, short or
    garbled, exactly as it does at a proper end-of-archive block. Recording the header error lets
    us tell a tar that was cut between members from one that was closed properly; it goes into a
    list of ours, not onto tarfile's objects.
    """

    class EndAwareTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf):
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as e:
                stops.append(e)
                raise

    return EndAwareTarInfo


def read_shard(url: str, load: Callable[[str], bool] | None = None) -> Iterator[RawSample]:
    """Stream the samples of one WebDataset tar (plain or compressed), never holding the whole tar.

    Consecutive members sharing a key form one sample. A key that comes back later in the shard
    (or repeats an extension of the sample being built) is yielded again with a higher
    ``occurrence`` and failure DUPLICATE_KEY. If the tar breaks off, the samples completed
    before the break are yielded normally, the one being read is yielded with failure
    TRUNCATED_TAR, and iteration ends without raising. Raises ShardReadError (on the first
    ``next()``) when the shard is not readable as a tar at all.

    ``load`` (training's index of a local tar: images by offset, never in memory) reads only the
    members whose lower-cased extension as written ("jpg", "def.txt" for a dotted key) it
    accepts; every other member stays in the tar, its place in ``RawSample.spans``. Offsets are
    the file's own only in an uncompressed tar, so with ``load`` a compressed shard is refused
    (ShardReadError). Samples, keys and verdicts are the same either way.
    """
    sidecar = read_sidecar(url)
    stops: list[tarfile.HeaderError] = []
    with fsspec.open(url, "rb") as raw:
        try:
            tf = tarfile.open(fileobj=raw, mode="r|*" if load is None else "r|", tarinfo=_end_aware(stops))
        except (tarfile.TarError, EOFError, zlib.error) as e:
            what = "a readable tar archive" if load is None else "a readable uncompressed tar archive"
            raise ShardReadError(f"{url}: not {what}: {e}") from e
        with tf:
            yield from _samples(tf, url, sidecar, load, stops)


def _samples(
    tf: tarfile.TarFile,
    url: str,
    sidecar: dict[str, dict],
    load: Callable[[str], bool] | None,
    stops: list[tarfile.HeaderError],
) -> Iterator[RawSample]:
    shard = shard_id(url)
    # key -> (copies seen so far, index of the first copy's first member, that member's name)
    seen: dict[str, tuple[int, int, str]] = {}
    # The WebDataset group being read: its first-dot key and members (ext, lower ext, bytes or
    # Span, index, name).
    group_key: str | None = None
    group: list[tuple[str, str, bytes | Span, int, str]] = []
    group_first: tuple[int, str] = (0, "")  # (index, name) of the group's first member
    stop: BaseException | None = None

    def flush() -> list[RawSample]:
        out = []
        for key, items in split_group(group_key, group):
            first_index, first_name = (items[0][2], items[0][3]) if items else group_first
            # By its printable form, so two keys that print alike are one key and its duplicate.
            sample = _start_sample(shard, printable_key(key), first_index, first_name, seen, sidecar)
            for ext, data, _, _ in items:
                if isinstance(data, Span):
                    sample.spans[ext] = data
                else:
                    sample.members[ext] = data
            _check_safe(sample, key, [ext for ext, _, _, _ in items])
            out.append(sample)
        return out

    try:
        for index, member in enumerate(tf):
            # Stream mode still appends every header to tf.members; drop them to stay O(1).
            tf.members = []
            if not member.isreg():
                continue
            split = split_name(member.name)
            if split is None:
                continue
            key, ext, lower = split
            if group_key is None or key != group_key or any(lower == g[1] for g in group):
                if group_key is not None:
                    yield from flush()
                group_key, group, group_first = key, [], (index, member.name)
            if load is None or load(lower):
                data = tf.extractfile(member).read()
            else:
                # Not read: the stream skips over it, and a tar cut inside it ends at the next header.
                data = Span(member.offset_data, member.size)
            group.append((ext, lower, data, index, member.name))
    except _STREAM_ERRORS as e:
        stop = e
    else:
        ended_by = stops[-1] if stops else None
        if ended_by is not None and not isinstance(ended_by, tarfile.EOFHeaderError):
            # Without the end-of-archive block we cannot know whether this sample was complete.
            if isinstance(ended_by, tarfile.EmptyHeaderError):
                stop = EOFError("archive ends without an end-of-archive block")
            else:
                stop = tarfile.ReadError(f"broken tar header: {ended_by}")

    if group_key is None:
        if stop is not None:
            log.warning("%s: tar broke off before its first sample: %s", url, stop)
        return
    last = flush()
    if stop is not None:
        # Every sample of the group being read at the break: more of its members may have followed.
        for current in last:
            complete = ", ".join(sorted([*current.members, *current.spans])) or "none"
            note = f"tar ended inside this sample (complete members: {complete}): {stop}"
            if current.failure != Reason.UNSAFE_KEY:
                current.failure = Reason.TRUNCATED_TAR
            current.detail = f"{current.detail}; {note}" if current.detail else note
            log.warning("%s: truncated tar at key %r: %s", url, current.key, stop)
    yield from last


def _check_safe(sample: RawSample, key: str, exts: list[str]) -> None:
    """Fail a sample whose key (as read) or a member extension is unsafe as a tar member name."""
    if (note := unsafe_sample_note(key, exts)) is not None:
        sample.failure = Reason.UNSAFE_KEY
        sample.detail = f"{note}; {sample.detail}" if sample.detail else note


def _start_sample(
    shard: str,
    key: str,
    index: int,
    name: str,
    seen: dict[str, tuple[int, int, str]],
    sidecar: dict[str, dict],
) -> RawSample:
    sample = RawSample(shard=shard, key=key, occurrence=0, members={}, sidecar=sidecar.get(key))
    if key in seen:
        copies, first_index, first_name = seen[key]
        sample.occurrence = copies
        sample.failure = Reason.DUPLICATE_KEY
        sample.detail = f"key already seen at tar member #{first_index} ({printable_key(first_name)})"
        seen[key] = (copies + 1, first_index, first_name)
    else:
        seen[key] = (1, index, name)
    return sample


# --------------------------------------------------------------------------- sample accessors


def text_of(sample: RawSample, max_bytes: int = MAX_TEXT_BYTES) -> tuple[str | None, str | None]:
    """The web text of a sample, stripped, as (text, None); or (None, rejection reason).

    The "txt" member wins; without one, the sidecar's "caption" stands in (an empty caption
    there counts as an empty text, a null one as missing). The length limit applies to the
    stripped text in UTF-8 bytes.
    """
    raw = sample.members.get("txt")
    if raw is not None:
        try:
            # utf-8-sig: a leading BOM is an encoding artefact, not part of the caption.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, Reason.WEB_TEXT_NOT_UTF8
    else:
        caption = (sample.sidecar or {}).get("caption")
        if not isinstance(caption, str):
            return None, Reason.WEB_TEXT_MISSING
        text = caption
    text = text.strip()
    if not text:
        return None, Reason.WEB_TEXT_EMPTY
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        return None, Reason.WEB_TEXT_TOO_LONG
    return text, None


def image_ext(exts) -> str | None:
    """Which of a sample's member extensions is its image: plain extensions first, in
    IMAGE_EXTENSIONS order, then multi-part ones ("x.jpg"); None when there is no image."""
    for ext in IMAGE_EXTENSIONS:
        if ext in exts:
            return ext
    for ext in IMAGE_EXTENSIONS:
        for full in exts:
            if full.endswith("." + ext):
                return full
    return None


def image_member(sample: RawSample) -> tuple[str, bytes] | None:
    """(extension, bytes) of the image among the members read (`image_ext`'s choice)."""
    ext = image_ext(sample.members)
    return None if ext is None else (ext, sample.members[ext])


def url_of(sample: RawSample) -> str | None:
    """The source URL: the sidecar's "url", else the "url" field of a parseable json member."""
    url = (sample.sidecar or {}).get("url")
    if isinstance(url, str) and url:
        return url
    raw = sample.members.get("json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) and url else None
