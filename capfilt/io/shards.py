"""Listing input shards and streaming raw samples out of WebDataset tars.

This module deals only in bytes: decoding images and judging texts happen later. Its promise
(DESIGN §6) is that a damaged shard never crashes a job and never loses a key silently:
duplicate keys and truncated tars come out as samples carrying a ``failure`` reason, so the
caller can count them. Only a shard that cannot be read as a tar at all raises.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import unicodedata
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq
from braceexpand import braceexpand

from capfilt.config import MAX_TEXT_BYTES
from capfilt.records import Reason

log = logging.getLogger(__name__)

# In order of preference when a sample carries more than one image member.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

_GLOB_CHARS = "*?["
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_TAR_SUFFIXES = (".tar", ".tgz", ".tbz2", ".txz")

# Errors that mean "the byte stream ended or went bad here". OSError is included because a
# short or corrupt compressed stream surfaces as one; its message goes into the sample detail.
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class ShardReadError(tarfile.ReadError):
    """The shard cannot be read as a tar at all: not a tar, empty, or broken in its first header."""


@dataclass
class RawSample:
    shard: str
    key: str
    occurrence: int  # 0 for the first copy of a key in this shard, 1, 2... for later copies
    members: dict[str, bytes]  # full extension after the key, lower-cased ("jpg", "x.jpg") -> bytes
    failure: str | None = None  # a records.Reason when the reader itself knows the sample is broken
    detail: str = ""
    sidecar: dict | None = None  # this key's row of the shard's parquet sidecar, if any


# --------------------------------------------------------------------------- listing shards


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Resolve paths, globs, brace ranges and fsspec URLs into a list of shard URLs.

    Order is kept as given (each glob's matches sorted), repeats are dropped. Raises
    FileNotFoundError for a pattern or path that names nothing, and ValueError when two shards
    share a shard id, since their outputs would overwrite each other.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards: list[str] = []
    seen: set[str] = set()
    missing: list[str] = []
    for item in items:
        for pattern in braceexpand(os.fspath(item)):
            try:
                urls = _resolve(pattern)
            except FileNotFoundError as e:
                # Keep going: a range with gaps is easier to fix when every gap is named at once.
                missing.append(str(e))
                continue
            for url in urls:
                if url not in seen:
                    seen.add(url)
                    shards.append(url)
    if missing:
        shown = "; ".join(missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise FileNotFoundError(f"{shown}{more}")
    if not shards:
        raise ValueError("no input shards given")

    by_id: dict[str, list[str]] = {}
    for url in shards:
        by_id.setdefault(shard_id(url), []).append(url)
    clashes = {sid: urls for sid, urls in by_id.items() if len(urls) > 1}
    if clashes:
        listing = "; ".join(f"{sid!r}: {', '.join(urls)}" for sid, urls in sorted(clashes.items()))
        raise ValueError(f"shards with the same id would overwrite each other's outputs: {listing}")
    return shards


def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _resolve(pattern: str) -> list[str]:
    if "://" in pattern:
        fs, path = fsspec.core.url_to_fs(pattern)
        if _has_glob(path):
            found = fs.glob(path, detail=True)
            matches = sorted(fs.unstrip_protocol(p) for p, info in found.items() if info.get("type") == "file")
            if not matches:
                raise FileNotFoundError(f"no shard matches {pattern!r}")
            return matches
        if not fs.exists(path):
            raise FileNotFoundError(f"shard not found: {pattern!r}")
        if fs.isdir(path):
            raise IsADirectoryError(f"{pattern!r} is a directory; name its shards with a glob")
        return [pattern]

    # A literal file name may itself contain glob characters ("img[1].tar"); prefer it.
    if os.path.isfile(pattern):
        return [pattern]
    if _has_glob(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"no shard matches {pattern!r}")
        return matches
    if os.path.isdir(pattern):
        raise IsADirectoryError(f"{pattern!r} is a directory; name its shards with a glob")
    raise FileNotFoundError(f"shard not found: {pattern!r}")


def shard_id(url: str) -> str:
    """The file stem that names every output of a shard: ".../00012.tar.gz" -> "00012"."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    lower = name.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            name, lower = name[: -len(suffix)], lower[: -len(suffix)]
            break
    for suffix in _TAR_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    stem = os.path.splitext(name)[0]
    return stem or name


# --------------------------------------------------------------------------- sidecars


def sidecar_url(url: str) -> str:
    """Where img2dataset puts a shard's parquet: next to it, named by the shard id."""
    head, sep, _ = url.rpartition("/")
    return f"{head}{sep}{shard_id(url)}.parquet"


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


class _EndAwareTarInfo(tarfile.TarInfo):
    """Remembers why the archive's member list ended.

    tarfile stops iterating *silently* when a header after the first is missing, short or
    garbled, exactly as it does at a proper end-of-archive block. Recording the header error lets
    us tell a tar that was cut between members from one that was closed properly.
    """

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._capfilt_stop = e
            raise


def split_name(name: str) -> tuple[str, str, str] | None:
    """WebDataset's rule (``base_plus_ext``): the key runs to the first "." of the basename.

    Returns (key, extension as written, extension lower-cased), or None for a name that is not a
    sample member (no extension, a hidden ``.name`` or a ``__meta__`` name). Names of two or more
    leading dots are read as keys of dots (below), where WebDataset skips them. A leading ``./``
    (``tar -C dir -cf x.tar .``) is dropped first: it names the same member as the bare name.
    """
    while name.startswith("./"):
        name = name[2:]
    dirname, sep, base = name.rpartition("/")
    if base.startswith("__") or "." not in base:
        return None
    if base.startswith("."):
        # WebDataset skips every basename starting with "."; capfilt reads a run of two or more dots
        # as a key of dots ("..jpg" -> key ".", "...jpg" -> ".."), so that such a sample is counted
        # (and failed or flagged like any key: `_check_safe`, `key_warning`). One dot leaves no key:
        # a hidden file (".DS_Store", ".x.jpg") is not a sample member, as in WebDataset.
        dots = len(base) - len(base.lstrip("."))
        if dots < 2 or dots == len(base):
            return None
        ext = base[dots:]
        return dirname + sep + base[: dots - 1], ext, ext.lower()
    stem, ext = base.split(".", 1)
    if not ext:
        return None
    return dirname + sep + stem, ext, ext.lower()


# --------------------------------------------------------------------------- key rules
#
# Dotted keys. WebDataset splits a member name at the first "." of its basename, so
# "abc.def.jpg" + "abc.def.txt" is the key "abc" with fields "def.jpg" and "def.txt", and the web
# text ("txt") and the URL ("json") of such a sample would be lost. capfilt groups members exactly
# as WebDataset does (consecutive members with the same first-dot key, a repeated extension
# starting a new sample), and then, inside one such group:
#   - if any member has a one-part extension ("jpg", "txt"), the group is one sample under the
#     first-dot key and longer extensions are WebDataset's multi-part fields ("x.jpg", "seg.png");
#   - otherwise every extension has the form "P.ext" and the members are split by P in order of
#     first appearance: each P is one sample with the key "{first-dot key}.{P}" and the one-part
#     extensions ("abc.def.jpg" -> key "abc.def", field "jpg"). The key keeps its case as written.
# A cleaned shard writes "{key}.{ext}", so a dotted key comes out named exactly as it came in.
#
# Unsafe keys. A key is written into the cleaned tar as a member name "{key}.{ext}", so a key that
# is empty, "." or "..", contains "/" or "\" (directories, absolute paths), a control character or
# NUL, or is not valid UTF-8, fails its sample with Reason.UNSAFE_KEY (the sample is counted and in
# the ledger, never in the tar). The same holds for a member extension with such characters.

_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
# The longest file name (one path component) that file systems and tar extractors create: 255
# bytes (NAME_MAX on Linux and macOS, NTFS's 255 UTF-16 units). A longer member name is a valid tar
# name that no reader can extract (GNU tar: "File name too long"; tarfile's data filter aborts).
MAX_NAME_BYTES = 255
# Members capfilt writes for a kept sample besides its input members: {key}.txt and {key}.json.
_WRITTEN_EXTS = ("txt", "json")


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` (a key, or a whole tar member name) is unsafe as a tar member name; None if safe."""
    if not name:
        return "empty name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if name in (".", ".."):
        return f"{name!r} is a path component"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"{len(name.encode('utf-8'))} bytes, over the {MAX_NAME_BYTES} a file name may have"
    bad = _UNSAFE_CHARS.search(name)
    if bad:
        char = bad.group()
        what = "a path separator" if char in "/\\" else ("NUL" if char == "\x00" else "a control character")
        return f"contains {what} ({char!r})"
    return None


# Format characters (Unicode category Cf: zero-width spaces and joiners, direction overrides and
# isolates, the BOM, ...) are invisible or reorder what is shown around them.
def key_warning(key: str) -> str | None:
    """Why a key that is safe to write may mislead a person reading it, or None: it displays as
    another name (not in Unicode NFC form; invisible or direction-changing characters), or starts
    with "." (WebDataset readers skip such member names as hidden). The sample is processed as
    usual; the ledger's ``key_warning`` says this so that a user can find it."""
    warnings = []
    if key.startswith("."):
        warnings.append("starts with '.': WebDataset readers skip its members as hidden files")
    try:
        nfc = unicodedata.normalize("NFC", key)
    except (TypeError, ValueError):
        nfc = key
    if nfc != key:
        warnings.append(f"not in Unicode NFC form: displays like {nfc!r}, a different name")
    hidden = sorted({c for c in key if unicodedata.category(c) == "Cf"})
    if hidden:
        named = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, 'FORMAT CHARACTER')}" for c in hidden)
        warnings.append(f"contains invisible or direction-changing characters ({named})")
    return "; ".join(warnings) or None


def check_member_name(name: str) -> str:
    """For tar writers: ``name`` itself if it is a safe member name, else ValueError."""
    if (why := unsafe_name_reason(name)) is not None:
        raise ValueError(f"refusing to write the unsafe tar member name {name!r}: {why}")
    return name


def _printable_key(key: str) -> str:
    """A key that is not valid UTF-8 (tarfile hands it over with surrogate escapes) as a
    string that can go into parquet and JSON: the bad bytes as \\xNN."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        try:
            raw = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = key.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


def split_group(key: str, members: list[tuple[str, str, bytes, int, str]]):
    """One WebDataset group -> [(key, [(ext, bytes, index, name), ...]), ...] (rule above)."""
    parts = [ext.rpartition(".") for ext, _, _, _, _ in members]
    if not members or any(not prefix or not last for prefix, _, last in parts):
        return [(key, [(lower, data, index, name) for _, lower, data, index, name in members])]
    groups: dict[str, list] = {}
    for (prefix, _, last), (_, _, data, index, name) in zip(parts, members):
        groups.setdefault(prefix, []).append((last.lower(), data, index, name))
    return [(f"{key}.{prefix}", items) for prefix, items in groups.items()]


def read_shard(url: str) -> Iterator[RawSample]:
    """Stream the samples of one WebDataset tar (plain or compressed), never holding the whole tar.

    Consecutive members sharing a key form one sample. A key that comes back later in the shard
    (or repeats an extension of the sample being built) is yielded again with a higher
    ``occurrence`` and failure DUPLICATE_KEY. If the tar breaks off, the samples completed
    before the break are yielded normally, the one being read is yielded with failure
    TRUNCATED_TAR, and iteration ends without raising. Raises ShardReadError (on the first
    ``next()``) when the shard is not readable as a tar at all.
    """
    sidecar = read_sidecar(url)
    with fsspec.open(url, "rb") as raw:
        try:
            tf = tarfile.open(fileobj=raw, mode="r|*", tarinfo=_EndAwareTarInfo)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ShardReadError(f"{url}: not a readable tar archive: {e}") from e
        with tf:
            yield from _samples(tf, url, sidecar)


def _samples(tf: tarfile.TarFile, url: str, sidecar: dict[str, dict]) -> Iterator[RawSample]:
    shard = shard_id(url)
    # key -> (copies seen so far, index of the first copy's first member, that member's name)
    seen: dict[str, tuple[int, int, str]] = {}
    # The WebDataset group being read: its first-dot key and members (ext, lower ext, bytes, index, name).
    group_key: str | None = None
    group: list[tuple[str, str, bytes, int, str]] = []
    group_first: tuple[int, str] = (0, "")  # (index, name) of the group's first member
    stop: BaseException | None = None

    def flush() -> list[RawSample]:
        out = []
        for key, items in split_group(group_key, group):
            first_index, first_name = (items[0][2], items[0][3]) if items else group_first
            # By its printable form, so two keys that print alike are one key and its duplicate.
            sample = _start_sample(shard, _printable_key(key), first_index, first_name, seen, sidecar)
            for ext, data, _, _ in items:
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
            group.append((ext, lower, tf.extractfile(member).read(), index, member.name))
    except _STREAM_ERRORS as e:
        stop = e
    else:
        ended_by = getattr(tf, "_capfilt_stop", None)
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
            complete = ", ".join(sorted(current.members)) or "none"
            note = f"tar ended inside this sample (complete members: {complete}): {stop}"
            if current.failure != Reason.UNSAFE_KEY:
                current.failure = Reason.TRUNCATED_TAR
            current.detail = f"{current.detail}; {note}" if current.detail else note
            log.warning("%s: truncated tar at key %r: %s", url, current.key, stop)
    yield from last


def _check_safe(sample: RawSample, key: str, exts: list[str]) -> None:
    """Fail a sample whose key (as read) or a member extension is unsafe as a tar member name."""
    if (why := unsafe_name_reason(key)) is not None:
        note = f"key {sample.key!r} is unsafe as a tar member name: {why}"
    else:
        bad = next((e for e in exts if unsafe_name_reason(e) is not None), None)
        if bad is None:
            # Each member capfilt would write, "{key}.{ext}", must be extractable too.
            names = [f"{key}.{e}" for e in (*exts, *_WRITTEN_EXTS)]
            long = max(names, key=lambda n: len(n.encode("utf-8")))
            if len(long.encode("utf-8")) <= MAX_NAME_BYTES:
                return
            note = (
                f"member {long[:24] + '…' + long[-8:]!r} is unsafe as a tar member name: "
                f"{unsafe_name_reason(long)}, so no reader could extract it"
            )
        else:
            note = (
                f"member {sample.key + '.' + _printable_key(bad)!r} is unsafe as a tar member name: "
                f"{unsafe_name_reason(bad)}"
            )
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
        sample.detail = f"key already seen at tar member #{first_index} ({_printable_key(first_name)})"
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


def image_member(sample: RawSample) -> tuple[str, bytes] | None:
    """(extension, bytes) of the image: plain extensions first, in IMAGE_EXTENSIONS order."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample.members:
            return ext, sample.members[ext]
    for ext in IMAGE_EXTENSIONS:
        for full, data in sample.members.items():
            if full.endswith("." + ext):
                return full, data
    return None


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
