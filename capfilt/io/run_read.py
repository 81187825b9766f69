"""Reading a run's files from wherever `capfilt run` can write them: a local path, or the same fsspec
URL (``s3://bucket/prefix``) that was its --output.

Every command that reads a run (report, calibrate, rethreshold, the loop) reads it through these,
through the run's `OutputFolder`; paths inside a run never go through pathlib.
"""

from __future__ import annotations

import json
import os

from capfilt.io.folder import OutputFolder
from capfilt.io.names import RUN_FILE, shard_file


def run_url(run: str | os.PathLike, *parts: str) -> str:
    """A file of a run as a readable location: a local path, or ``proto://…`` for a URL."""
    return OutputFolder(run).url_of("/".join(parts))


def is_run(run: str | os.PathLike) -> bool:
    """Whether ``run`` (a path or URL) holds a run record (run.json)."""
    folder = OutputFolder(run)
    folder.refresh()
    return folder.isfile(RUN_FILE)


def read_run_record(run: str | os.PathLike) -> dict:
    """run.json of a run; FileNotFoundError naming the location when there is none."""
    raw = OutputFolder(run).read(RUN_FILE)
    if raw is None:
        raise FileNotFoundError(f"{os.fspath(run)} is not a capfilt run (no run.json)")
    return json.loads(raw)


def read_run_json(run: str | os.PathLike, *parts: str) -> dict:
    """A JSON file of a run (``summary.json``, ``stats``, ``00000.json``), or {} where it is not."""
    raw = OutputFolder(run).read("/".join(parts))
    return json.loads(raw) if raw is not None else {}


def read_stats(run: str | os.PathLike) -> list[dict]:
    """The run's stats files (one per committed shard), in shard order."""
    folder = OutputFolder(run)
    return [json.loads(folder.cat_file(shard_file("stats", s))) for s in folder.shard_ids("stats")]


def ledger_files(run_dir: str | os.PathLike) -> list[str]:
    """The ledger files of a run (local paths, or ``proto://…`` URLs), one per committed shard, in
    shard order."""
    folder = OutputFolder(run_dir)
    return [folder.url_of(shard_file("ledger", s)) for s in folder.shard_ids("ledger")]


def read_ledger_table(run_dir: str | os.PathLike, shard: str | None = None):
    """The ledger of one shard (``shard``) or of the whole run, as a pyarrow Table (None when the
    run has no ledger yet)."""
    import pyarrow.parquet as pq

    folder = OutputFolder(run_dir)
    names = [shard_file("ledger", shard)] if shard else [shard_file("ledger", s) for s in folder.shard_ids("ledger")]
    if not names:
        return None
    paths = [folder._join(n) for n in names]  # paths inside the folder's file system, as pyarrow takes them
    return pq.read_table(paths if len(paths) > 1 else paths[0], filesystem=folder.fs)


def read_ledger(run_dir: str | os.PathLike) -> list[dict]:
    """Every ledger row of a run (one per candidate text), shard after shard."""
    table = read_ledger_table(run_dir)
    return table.to_pylist() if table is not None else []
