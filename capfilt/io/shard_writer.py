"""Streaming writer of one shard's outputs: the cleaned tar, the ledger, the LAION parquet, stats.

A shard can hold 10k samples of megapixel images, so nothing of it stays in memory but counts:
`add(batch)` streams the batch's kept images into the tar and buffers its ledger rows (no image
bytes) until a row group is full, so the caller drops the batch, decoded pixels and all, as soon
as the last stage is done with it. Row groups have a fixed size, so the files' bytes do not depend
on how the samples were batched (the local and the Ray runner batch differently).

A batch goes in in two steps: `output.render(batch)` turns it into its share of the shard's
outputs (a `Rendered`: the tar members' bytes, ledger and LAION rows, failure examples), and
`ShardWriter.add_rendered` appends that share. Every runner does both in its shard worker
(runners/worker.py), in the process that ran the stages.

Commit (`commit()`): every file is written under the name the output folder stages it under
(io/folder.py: a temporary name locally, the final name on an object store, whose old marker
is deleted first), then published, and the shard's completion marker is written last. A shard
without a marker is incomplete, and resume redoes it (its leftovers are swept on start); the
files' bytes are the same either way and on every rewrite. `abort()` removes the staged files.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from itertools import groupby

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.io.embeddings import KINDS, EmbeddingFiles
from capfilt.io.folder import OutputFolder
from capfilt.io.names import SUBDIRS, shard_file, token
from capfilt.io.output import Rendered, render
from capfilt.io.upstream import read_upstream
from capfilt.records import (
    FAILED,
    IMAGE_REJECTIONS,
    LAION_SCHEMA,
    LEDGER_SCHEMA,
    REJECTED,
    Reason,
    empty_stats,
)

ROW_GROUP = 8192  # ledger / LAION rows per parquet row group


class _Staging:
    """One shard's files between its start and its commit: each opened under the name the output
    folder stages it under, all published at commit, the marker last. No branch on the kind of
    location here: the folder's one property (`OutputFolder.renames`) decides."""

    def __init__(self, folder: OutputFolder, shard: str):
        self.folder, self.shard, self.token = folder, shard, token()
        self.staged: dict[str, str] = {}  # final name -> the name it is written under
        folder.make_folders(*SUBDIRS)
        folder.start_shard(shard)

    def open(self, rel: str):
        self.folder.make_folders(posixpath.dirname(rel))  # (embeddings/…: made by the first shard that has them)
        self.staged[rel] = self.folder.staged(rel, self.token)
        return self.folder.open_new(self.staged[rel])

    def close(self, f) -> None:
        self.folder.close_synced(f)

    def write(self, rel: str, data: bytes) -> None:
        f = self.open(rel)
        f.write(data)
        self.close(f)

    def commit(self, before_marker=None) -> None:
        for rel, staged in self.staged.items():
            self.folder.publish(staged, rel)
        if before_marker:
            before_marker()
        self.folder.mark_complete(self.shard)

    def abort(self) -> None:
        for staged in self.staged.values():
            self.folder.remove(staged)


class _TarStream:
    """A tar file written as concatenated member bytes (`tar_members`), then ended as
    tarfile ends one: two zero blocks, zero-padded to a whole record (tarfile.RECORDSIZE)."""

    def __init__(self, staging: _Staging, rel: str):
        self.staging, self.file, self.offset = staging, staging.open(rel), 0

    def write(self, members: bytes) -> None:
        self.file.write(members)
        self.offset += len(members)

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.file.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
        self.staging.close(self.file)


class _Table:
    """Parquet rows written in fixed-size row groups as they come (opened at the first row)."""

    def __init__(self, staging: _Staging, rel: str, schema: pa.Schema | None = None):
        self.staging, self.rel, self.schema, self.rows, self.writer, self.file = staging, rel, schema, [], None, None

    def extend(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        while len(self.rows) >= ROW_GROUP:
            self._flush(self.rows[:ROW_GROUP])
            self.rows = self.rows[ROW_GROUP:]

    def _flush(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self.writer is None:
            self.file = self.staging.open(self.rel)
            self.writer = pq.ParquetWriter(self.file, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.rows or self.writer is None:  # an empty shard still gets a (row-less) file
            self._flush(self.rows)
            self.rows = []
        self.writer.close()
        self.staging.close(self.file)


class ShardWriter:
    """add(batch)... then commit() (marker last), or abort()."""

    def __init__(self, out: str | OutputFolder, shard: str, *, laion: bool = False, source: str | None = None):
        self.folder = out if isinstance(out, OutputFolder) else OutputFolder(out)
        self.shard, self.laion, self.source = shard, laion, source
        self.staging = _Staging(self.folder, shard)
        self.tar = _TarStream(self.staging, shard_file("shards", shard))
        self.ledger = _Table(self.staging, shard_file("ledger", shard), LEDGER_SCHEMA)
        self.laion_table = _Table(self.staging, shard_file("laion", shard), LAION_SCHEMA) if laion else None
        self.embeddings = None  # EmbeddingFiles: made by the first batch that has embeddings
        self.stats = empty_stats(shard)
        self.keys: set[str] = set()
        self.details: dict[str, str] = {}
        self.rejections: dict[str, dict[str, int]] = {"web": {}, "synthetic": {}}

    def add(self, batch: dict) -> None:
        """One batch of decided rows (column dicts, as the stages return them)."""
        self.add_rendered(render(batch, self.laion))

    def add_rendered(self, part: Rendered) -> None:
        """One batch's share of the outputs (`render`), in the shard's order."""
        self.tar.write(part.members)
        if part.embeddings is not None:
            if self.embeddings is None:
                self.embeddings = EmbeddingFiles()
            self.embeddings.add(part.embeddings)
        self.ledger.extend(part.ledger)
        if self.laion_table is not None:
            self.laion_table.extend(part.laion)
        for reason, example in part.details.items():
            self.details.setdefault(reason, example)
        # A sample's ledger rows are consecutive and (key, occurrence) is unique within a shard.
        for (key, _), rows in groupby(part.ledger, key=lambda r: (r["key"], r["occurrence"])):
            self.keys.add(key)
            self._count(list(rows))

    def _count(self, ledger: list[dict]) -> None:
        """The stats of one sample (its ledger rows: one per candidate, or its failure row)."""
        s, status = self.stats, ledger[0]["sample_status"]
        s["input"] += 1
        s[status] += 1
        if status == FAILED:
            s["failed_by_reason"][ledger[0]["reason"]] = s["failed_by_reason"].get(ledger[0]["reason"], 0) + 1
        elif status == REJECTED:
            # rejected for its image (decide's image rules, dedup) when its texts say so, else no text kept
            image = next((r["reason"] for r in ledger if r["reason"] in IMAGE_REJECTIONS), Reason.NO_TEXT_KEPT)
            s["rejected_by_reason"][image] = s["rejected_by_reason"].get(image, 0) + 1
        for r in ledger:
            if r["source"] is None:
                continue
            if r["selected"]:
                s["selected"][r["source"]] += 1
            s["candidates"][r["source"]]["kept" if r["kept"] else "rejected"] += 1
            if not r["kept"]:
                by = self.rejections[r["source"]]
                by[r["reason"]] = by.get(r["reason"], 0) + 1

    def commit(self, before_marker=None) -> dict:
        """Close every file, publish them, marker last; returns the shard's stats.
        ``before_marker()`` runs just before the marker is written and may raise to withhold it."""
        self.tar.close()
        self.ledger.close()
        if self.laion_table is not None:
            self.laion_table.close()
        if self.embeddings is not None:  # (text_emb: only for clip.K.embeddings image_text)
            for kind, data in self.embeddings.files().items():
                self.staging.write(shard_file(KINDS[kind], self.shard), data)
        stats = self.stats
        stats["candidate_rejections_by_reason"] = {s: dict(sorted(c.items())) for s, c in self.rejections.items()}
        stats["failure_examples"] = self.details
        stats.update(read_upstream(self.source, self.keys))
        self.staging.write(shard_file("stats", self.shard), json.dumps(stats, indent=1).encode())
        self.staging.commit(before_marker)
        return stats

    def abort(self) -> None:
        for f in (self.tar.file, self.ledger.file, getattr(self.laion_table, "file", None)):
            if f is not None and not f.closed:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - an upload that fails here is deleted below anyway
                    pass
        self.staging.abort()


def write_shard(out, shard: str, rows: list[dict], laion: bool = False, source: str | None = None) -> dict:
    """Commit one shard from its decided rows (column dicts, as the stages return them).

    ``source`` is the input shard's url: its img2dataset sidecar / ``_stats.json`` give the
    shard's ``upstream_failed`` counts (samples attempted upstream that never reached the tar).
    A caller that has the batches one at a time streams them through a `ShardWriter` instead.
    """
    writer = ShardWriter(out, shard, laion=laion, source=source)
    try:
        for batch in rows:
            writer.add(batch)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
