"""Tar member names and sample keys: how WebDataset members group into samples, and which keys
and member names are unsafe to write back into a tar or may mislead a reader.

Read by the input reader (io/shards.py) and by every tar writer (`check_member_name`).
"""

from __future__ import annotations

import re
import unicodedata


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
        # (and failed or flagged like any key: `unsafe_sample_note`, `key_warning`). One dot leaves no key:
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


def printable_key(key: str) -> str:
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


def unsafe_sample_note(key: str, exts: list[str]) -> str | None:
    """Why a sample read under ``key`` (as tarfile gave it) with member extensions ``exts`` cannot
    be written back into a tar (its ``Reason.UNSAFE_KEY`` detail), or None when it can."""
    if (why := unsafe_name_reason(key)) is not None:
        return f"key {printable_key(key)!r} is unsafe as a tar member name: {why}"
    bad = next((e for e in exts if unsafe_name_reason(e) is not None), None)
    if bad is not None:
        return (
            f"member {printable_key(key) + '.' + printable_key(bad)!r} is unsafe as a tar member name: "
            f"{unsafe_name_reason(bad)}"
        )
    # Each member capfilt would write, "{key}.{ext}", must be extractable too.
    names = [f"{key}.{e}" for e in (*exts, *_WRITTEN_EXTS)]
    long = max(names, key=lambda n: len(n.encode("utf-8")))
    if len(long.encode("utf-8")) <= MAX_NAME_BYTES:
        return None
    return (
        f"member {long[:24] + '…' + long[-8:]!r} is unsafe as a tar member name: "
        f"{unsafe_name_reason(long)}, so no reader could extract it"
    )
