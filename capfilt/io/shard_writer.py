"""Streaming writer of one shard's outputs: the cleaned tar, the ledger, the LAION parquet, stats.

A shard can hold 10k samples of megapixel images, so nothing of it stays in memory but counts:
`add(batch)` streams the batch's kept images into the tar and buffers its ledger rows (no image
bytes) until a row group is full, so the caller drops the batch, decoded pixels and all, as soon
as the last stage is done with it. Row groups have a fixed size, so the files' bytes do not depend
on how the samples were batched (the local and the Ray runner batch differently).

A batch goes in in two steps: `render(batch)` turns it into its share of the shard's outputs (a
`Rendered`: the tar members' bytes, ledger and LAION rows, failure examples), and
`ShardWriter.add_rendered` appends that share. Every runner does both in its shard worker
(runners/worker.py), in the process that ran the stages.

Commit protocol (`commit()`), by the kind of output location (`output.location`):

* a local path: every file is written under a temporary name next to its final one, fsynced,
  renamed into place (os.replace), and the `_done/{shard}.done` marker is renamed in last;
* an fsspec URL (object stores have no atomic rename): the shard's old marker, if any, is deleted
  first; every file is streamed straight to its final name (an S3 object appears only when its
  upload completes), and the marker is written last, once the others are complete.

A shard without a marker is incomplete, and resume redoes it (its leftovers are swept on start);
the files' bytes are the same either way and on every rewrite. `abort()` removes the temporary
files (or, on an fsspec URL, this shard's files written so far).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.io.shards import check_member_name
from capfilt.records import (
    FAILED,
    IMAGE_REJECTIONS,
    KEPT,
    LAION_SCHEMA,
    LEDGER_SCHEMA,
    REJECTED,
    Reason,
    empty_stats,
)

ROW_GROUP = 8192  # ledger / LAION rows per parquet row group


def tar_members(members: list[tuple[str, bytes]]) -> bytes:
    """The bytes tarfile writes for these (name, data) members (PAX headers, mtime 0, mode 644),
    without the end-of-archive blocks, so that such byte strings concatenate into one tar."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    for name, data in members:
        info = tarfile.TarInfo(check_member_name(name))  # never a name that escapes where it is extracted
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()  # taken before close(): close() would append the end of the archive


class _TarStream:
    """A tar file written as concatenated member bytes (`tar_members`), then ended as
    tarfile ends one: two zero blocks, zero-padded to a whole record (tarfile.RECORDSIZE)."""

    def __init__(self, path, opener=open):
        self.file, self.offset = opener(path, "wb"), 0

    def write(self, members: bytes) -> None:
        self.file.write(members)
        self.offset += len(members)

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.file.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
        _sync_close(self.file)


@dataclass
class Rendered:
    """One batch's share of its shard's outputs, in sample order (see `render`)."""

    members: bytes  # the kept samples' tar members (`tar_members`)
    ledger: list[dict]  # every sample's ledger rows (one per candidate, or its failure row)
    laion: list[dict]  # LAION rows of the scored samples (empty unless laion)
    details: dict[str, str]  # failure reason -> its first example in this batch ("key: detail")
    embeddings: dict | None = None  # the scored samples' embeddings rows (io/embeddings.py), if the run writes them


def render(batch: dict, laion: bool = False) -> Rendered:
    """A batch of decided rows (column dicts, as the stages return them) as its outputs' share."""
    from capfilt.io.embeddings import embedding_rows
    from capfilt.io.output import laion_row, ledger_rows, sample_json

    members, ledger, laion_rows, details = [], [], [], {}
    for i in range(len(batch["key"])):
        rows = ledger_rows(batch, i)
        ledger.extend(rows)
        if batch["failure"][i]:
            details.setdefault(batch["failure"][i], f"{batch['key'][i]}: {batch['detail'][i]}")
        elif laion:
            laion_rows.append(laion_row(batch, i, rows))
        if not batch["failure"][i] and batch["status"][i] == KEPT:
            key, meta = batch["key"][i], sample_json(batch, i, rows)
            members += [
                (f"{key}.{batch['image_ext'][i]}", batch["image_bytes"][i]),
                (f"{key}.txt", meta["caption"].encode()),
                (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()),
            ]
    return Rendered(tar_members(members), ledger, laion_rows, details, embedding_rows(batch))


class _Table:
    """Parquet rows written in fixed-size row groups as they come (opened at the first row)."""

    def __init__(self, path: Path, schema: pa.Schema | None = None, opener=open):
        self.path, self.schema, self.rows, self.writer, self.file = path, schema, [], None, None
        self.opener = opener

    def extend(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        while len(self.rows) >= ROW_GROUP:
            self._flush(self.rows[:ROW_GROUP])
            self.rows = self.rows[ROW_GROUP:]

    def _flush(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self.writer is None:
            self.file = self.opener(self.path, "wb")
            self.writer = pq.ParquetWriter(self.file, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.rows or self.writer is None:  # an empty shard still gets a (row-less) file
            self._flush(self.rows)
            self.rows = []
        self.writer.close()
        _sync_close(self.file)


def _sync_close(f) -> None:
    """Flush and close; fsync a local file (a file of an fsspec file system commits on close)."""
    f.flush()
    if isinstance(f, io.BufferedWriter):
        os.fsync(f.fileno())
    f.close()


class ShardWriter:
    def __init__(
        self,
        out: str | os.PathLike,
        shard: str,
        subdirs: tuple[str, ...],
        tmp_mark: str,
        *,
        laion: bool = False,
        source: str | None = None,
    ):
        from capfilt.io.output import join, location

        self.fs, root = location(out)
        self.out, self.shard, self.laion, self.source = root, shard, laion, source
        self.final = {
            "shards": join(root, "shards", f"{shard}.tar"),
            "ledger": join(root, "ledger", f"{shard}.parquet"),
            "stats": join(root, "stats", f"{shard}.json"),
            "_done": join(root, "_done", f"{shard}.done"),
        }
        if laion:
            self.final["laion"] = join(root, "laion", f"{shard}.parquet")
        if self.fs is None:
            for sub in subdirs:
                (root / sub).mkdir(parents=True, exist_ok=True)
            suffix = self.tmp_suffix = f"{tmp_mark}{uuid.uuid4().hex[:8]}"
            self.tmp = {k: p.with_name(p.name + suffix) for k, p in self.final.items()}
            opener = open
        else:
            # No rename: files go straight to their final names. The shard's old marker goes
            # first, so that it never vouches for files while they are being rewritten.
            try:
                self.fs.rm_file(self.final["_done"])
            except FileNotFoundError:
                pass
            self.tmp = dict(self.final)
            opener = self.fs.open
        self.opener, self.embeddings = opener, None  # embeddings files: opened by the first batch that has them
        self.tar = _TarStream(self.tmp["shards"], opener)
        self.ledger = _Table(self.tmp["ledger"], LEDGER_SCHEMA, opener)
        self.laion_table = _Table(self.tmp["laion"], LAION_SCHEMA, opener) if laion else None
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
            self._embeddings().add(part.embeddings)
        self.ledger.extend(part.ledger)
        if self.laion_table is not None:
            self.laion_table.extend(part.laion)
        for reason, example in part.details.items():
            self.details.setdefault(reason, example)
        # A sample's ledger rows are consecutive and (key, occurrence) is unique within a shard.
        for (key, _), rows in groupby(part.ledger, key=lambda r: (r["key"], r["occurrence"])):
            self.keys.add(key)
            self._count(list(rows))

    def _embeddings(self):
        """The shard's `EmbeddingFiles`, its files named (final and temporary) beside the others."""
        if self.embeddings is None:
            from capfilt.io.embeddings import KINDS, EmbeddingFiles
            from capfilt.io.output import OWN_SUFFIXES, join

            self.embeddings = EmbeddingFiles()
            for kind, sub in KINDS.items():
                self.final[kind] = join(self.out, sub, f"{self.shard}{OWN_SUFFIXES[sub]}")
                if self.fs is None:
                    (self.out / sub).mkdir(parents=True, exist_ok=True)
                    self.tmp[kind] = self.final[kind].with_name(self.final[kind].name + self.tmp_suffix)
                else:
                    self.tmp[kind] = self.final[kind]
        return self.embeddings

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
        """Close every file, rename them into place, marker last; returns the shard's stats.
        ``before_marker()`` runs just before the marker is written and may raise to withhold it."""
        from capfilt.io.upstream import read_upstream

        self.tar.close()
        self.ledger.close()
        if self.laion_table is not None:
            self.laion_table.close()
        if self.embeddings is not None:
            written = self.embeddings.write(self.tmp, self.opener)
            for kind in [k for k in ("img_emb", "text_emb", "metadata") if k not in written]:
                del self.final[kind], self.tmp[kind]  # (text_emb: only for clip.K.embeddings image_text)
        stats = self.stats
        stats["candidate_rejections_by_reason"] = {s: dict(sorted(c.items())) for s, c in self.rejections.items()}
        stats["failure_examples"] = self.details
        stats.update(read_upstream(self.source, self.keys))
        data = json.dumps(stats, indent=1).encode()
        if self.fs is not None:  # every other file is complete: the stats, then the marker, last
            self.fs.pipe_file(self.final["stats"], data)
            if before_marker:
                before_marker()
            self.fs.pipe_file(self.final["_done"], b"")
            return stats
        f = open(self.tmp["stats"], "wb")
        f.write(data)
        _sync_close(f)
        _sync_close(open(self.tmp["_done"], "wb"))
        for kind in [k for k in self.final if k != "_done"]:
            os.replace(self.tmp[kind], self.final[kind])
        if before_marker:
            before_marker()
        os.replace(self.tmp["_done"], self.final["_done"])
        return stats

    def abort(self) -> None:
        for f in (self.tar.file, self.ledger.file, getattr(self.laion_table, "file", None)):
            if f is not None and not f.closed:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - an upload that fails here is deleted below anyway
                    pass
        for path in self.tmp.values():
            if self.fs is None:
                path.unlink(missing_ok=True)
                continue
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
