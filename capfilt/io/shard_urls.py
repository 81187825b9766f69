"""Naming input shards: paths, globs, brace ranges and fsspec URLs -> shard URLs, and the shard id.

The shard id (the file stem) names every output of a shard, so two shards with one id are refused
here, before anything is read. The sidecar's location is named by the same rule.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import fsspec
from braceexpand import braceexpand

from capfilt.io.folder import is_local, local_name

_GLOB_CHARS = "*?["
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_TAR_SUFFIXES = (".tar", ".tgz", ".tbz2", ".txz")


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
    if is_local(pattern):  # io/folder.py's one rule: file:// and local:// are globbed as the paths they are
        pattern = local_name(pattern)
    else:
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


def sidecar_url(url: str) -> str:
    """Where img2dataset puts a shard's parquet: next to it, named by the shard id."""
    head, sep, _ = url.rpartition("/")
    return f"{head}{sep}{shard_id(url)}.parquet"
