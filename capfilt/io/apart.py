"""The output must lie apart from the input shards' folders: capfilt writes into its output and
``--fresh`` deletes there (`check_apart`). Compares locations only; touches nothing."""

from __future__ import annotations

import os
import posixpath

import fsspec
from fsspec.registry import known_implementations

from capfilt.io.folder import is_local, local_path


class OutputOverlapsInput(ValueError):
    """The output location is, contains or lies inside the folder of an input shard."""


def _locations(url: str | os.PathLike) -> set[tuple[str, str]]:
    """Normalized (protocol, absolute path) of a local path or fsspec URL.

    A local path gives both its absolute form and its form with every link resolved, so a link
    cannot hide that two paths name the same folder. An fsspec URL is normalized by its file
    system class (``s3a://`` is ``s3://``), without any request to the store.
    """
    url = os.fspath(url)
    if is_local(url):
        path = os.fspath(local_path(url))
        return {("file", os.path.abspath(path)), ("file", os.path.realpath(path))}
    protocol, path = fsspec.core.split_protocol(url)
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
        if not is_local(url):
            proto, _, rest = url.partition("://")
            parents.setdefault(f"{proto}://{rest.rstrip('/').rpartition('/')[0]}", url)
        else:
            path = os.fspath(local_path(url))
            parents.setdefault(os.path.dirname(os.path.abspath(path)), url)
            if os.path.islink(path):  # a linked shard: the folder of what it points to counts too
                folders.setdefault(("file", os.path.dirname(os.path.realpath(path))), url)
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
