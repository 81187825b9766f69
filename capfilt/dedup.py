"""`capfilt dedup`: exact and near-duplicate images across a whole run, from its embeddings.

A second pass over what the run wrote (`clip.K.embeddings`): no image is decoded again and no model
is loaded. Two images are

* exact duplicates when their decoded pixels hash the same (``pixel_hash`` in the embeddings
  metadata, taken where the clip chain saw the pixels), and
* near duplicates when the cosine of their image embeddings is at least ``threshold`` (the
  re-encoded, resized, slightly cropped copies of one picture).

Only kept samples take part. The *first occurrence* stays: the run's items are ordered by input
shard (the run's input order) then by row within the shard, and an item is a duplicate when an
earlier item matches it; `duplicate_of` names the earliest earlier match. That rule is a pure
function of the run, so chunking, worker count and Ray change nothing.

The search is blocked by shard: the query block is one shard's kept rows, the key blocks every
shard up to it, each a float32 matmul of (rows x dim) by (dim x rows) — memory is two shards'
embeddings and one block of cosines, never the run. Files are read as memory maps (a remote run's
files are copied to a local cache first). `block_duplicates` is the unit of work: the local loop
runs them in order, `capfilt.runners.ray.dedup` runs one Ray task per shard. docs/benchmarks.md
has the measurements behind exact blocked matmul rather than faiss.

Results: the ``duplicates`` table (key, shard, duplicate_of, duplicate_of_shard, similarity, kind)
and, with an output, a derived run (as `capfilt rethreshold` derives one: images copied from the
inputs, no model) in which each duplicate is rejected with reason ``near_duplicate``.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.config import DEDUP_THRESHOLD
from capfilt.io.folder import OutputFolder, atomic_write, is_local, read_file
from capfilt.io.names import DUPLICATES_FILE, EMBEDDINGS, RUN_FILE, shard_file
from capfilt.records import FAILED, KEPT, REJECTED, Reason

DEFAULT_THRESHOLD = DEDUP_THRESHOLD  # cosine; measured against the synthetic world's planted copies (docs)
BLOCK = 4096  # query rows per matmul: a block of cosines is BLOCK x (key shard rows) float32
TABLE = DUPLICATES_FILE
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("duplicate_of", pa.string()),  # the earliest earlier image it matches (kept)
        pa.field("duplicate_of_shard", pa.string()),
        pa.field("similarity", pa.float32()),  # cosine of their embeddings (1.0 for an exact one)
        pa.field("kind", pa.string()),  # exact | near
    ]
)


@dataclass
class Block:
    """One shard's kept rows: where its embeddings lie and which of its rows take part."""

    shard: str
    npy: str  # its img_emb .npy: a local path or the run's URL (read where the block is searched)
    rows: np.ndarray  # indices of the kept rows in that file, in file order
    keys: list[str]
    hashes: list[str | None]


def plan(run: str | os.PathLike) -> list[Block]:
    """The run's blocks in its input order: every committed shard with embeddings, its kept rows."""
    import json

    from capfilt.config import parse_config
    from capfilt.io.shards import expand_shards, shard_id

    folder = OutputFolder(run)
    record = folder.read(RUN_FILE)
    if record is None:
        raise FileNotFoundError(f"{os.fspath(run)} is not a capfilt run (no run.json)")
    config = parse_config(json.loads(record)["config"])
    if config.clip is None or config.clip.embedder is None:
        raise ValueError(
            f"{os.fspath(run)} wrote no embeddings (no clip model with `embeddings` set): nothing to dedup"
        )
    img, meta_dir = EMBEDDINGS[0], EMBEDDINGS[2]
    blocks = []
    done = folder.completed()
    for url in expand_shards(config.input):
        shard = shard_id(url)
        if shard not in done:
            continue  # not committed: not part of the run's output
        meta = folder.read(shard_file(meta_dir, shard))
        if meta is None:
            continue  # an empty shard writes no embeddings
        rows = pq.read_table(io.BytesIO(meta)).to_pylist()
        ledger = pq.read_table(io.BytesIO(folder.read(shard_file("ledger", shard))))
        kept = {r["key"] for r in ledger.select(["key", "sample_status"]).to_pylist() if r["sample_status"] == KEPT}
        take = [n for n, r in enumerate(rows) if r["key"] in kept]
        blocks.append(
            Block(
                shard,
                folder.url_of(shard_file(img, shard)),
                np.asarray(take, dtype=np.int64),
                [rows[n]["key"] for n in take],
                [rows[n].get("pixel_hash") for n in take],
            )
        )
    return blocks


_CACHE: dict[str, str] = {}  # per process: a remote .npy's local copy (memory maps need a local file)


def _matrix(block: Block) -> np.ndarray:
    """The block's kept rows as float32, read through a memory map (only those rows are copied)."""
    path = block.npy
    if not is_local(path):
        if block.npy not in _CACHE:
            local = Path(tempfile.mkdtemp(prefix="capfilt-dedup-")) / f"{block.shard}.npy"
            local.write_bytes(read_file(block.npy))
            _CACHE[block.npy] = os.fspath(local)
        path = _CACHE[block.npy]
    return np.asarray(np.load(path, mmap_mode="r")[block.rows], dtype=np.float32)


def block_duplicates(blocks: list[Block], b: int, threshold: float) -> list[dict]:
    """The duplicates among block ``b``'s rows: each row's earliest earlier match over blocks
    0..b (exact by pixel hash first, then cosine >= threshold). The unit of work of a dedup pass."""
    query = blocks[b]
    if not len(query.rows):
        return []
    found: dict[int, dict] = {}
    earlier_hash: dict[str, tuple[int, int]] = {}
    for k in range(b + 1):
        for r, h in enumerate(blocks[k].hashes):
            if h is not None:
                earlier_hash.setdefault(h, (k, r))
    for r, h in enumerate(query.hashes):
        first = earlier_hash.get(h) if h is not None else None
        if first is not None and first < (b, r):
            k, j = first
            found[r] = _row(query, r, blocks[k], j, 1.0, "exact")
    q_all = _matrix(query)
    for start in range(0, len(query.rows), BLOCK):
        q = q_all[start : start + BLOCK]
        todo = np.array([r not in found for r in range(start, start + len(q))])
        for k in range(b + 1):
            if not todo.any():
                break
            keys = q_all if k == b else _matrix(blocks[k])
            sims = q @ keys.T  # cosines: the rows are L2-normalised
            if k == b:  # only earlier rows of the same shard count
                sims[np.arange(len(q))[:, None] + start <= np.arange(len(keys))[None, :]] = -np.inf
            hit = (sims >= threshold) & todo[:, None]
            rows_hit = np.flatnonzero(hit.any(axis=1))
            first = hit[rows_hit].argmax(axis=1)  # the earliest matching key of each row
            for i, j in zip(rows_hit, first):
                # the reported cosine is one fixed-order dot product: a BLAS block's value depends on
                # the block's shape, and the table must not depend on chunking
                similarity = float(np.dot(q[i], keys[j]))
                found[start + i] = _row(query, start + i, blocks[k], int(j), similarity, "near")
                todo[i] = False
    return [found[r] for r in sorted(found)]


def _row(query: Block, r: int, of: Block, j: int, similarity: float, kind: str) -> dict:
    return {
        "key": query.keys[r],
        "shard": query.shard,
        "duplicate_of": of.keys[j],
        "duplicate_of_shard": of.shard,
        "similarity": similarity,
        "kind": kind,
    }


def find_duplicates(blocks: list[Block], threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """Every duplicate of the run, in run order (the local loop over `block_duplicates`)."""
    return [row for b in range(len(blocks)) for row in block_duplicates(blocks, b, threshold)]


def write_table(rows: list[dict], path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=DUPLICATES_SCHEMA), buf)
    atomic_write(path, buf.getvalue())


def reject_duplicates(decided: dict, duplicates: set[str]) -> None:
    """Reject, in a derived run's decided rows of one shard, the samples whose key is in
    ``duplicates``: each text not rejected before scoring gets near_duplicate (accounting stays
    exact: the sample moves from kept to rejected with that reason)."""
    from capfilt.records import row_candidates

    for i, key in enumerate(decided["key"]):
        if key not in duplicates or decided["failure"][i] or decided["status"][i] == FAILED:
            continue
        cands = row_candidates(decided, i)
        decided["reasons"][i] = [c["reason"] or Reason.NEAR_DUPLICATE for c in cands]
        decided["kept"][i] = [False] * len(cands)
        decided["selected"][i] = -1
        decided["status"][i] = REJECTED


def dedup(
    run: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    output: str | None = None,
    table: str | None = None,
    ray_address: str | None = None,
    use_ray: bool = False,
    fresh: bool = False,
) -> dict:
    """Find the run's duplicates; write the table (``table``, and OUTPUT/duplicates.parquet) and,
    with ``output``, a derived run without them. Returns counts."""
    if not 0 < threshold <= 1:
        raise ValueError(f"--threshold must be a cosine in (0, 1], got {threshold}")
    blocks = plan(run)
    if use_ray:
        from capfilt.runners.ray.dedup import find_duplicates_on_ray

        rows = find_duplicates_on_ray(blocks, threshold, ray_address)
    else:
        rows = find_duplicates(blocks, threshold)
    if table:
        write_table(rows, table)
    result = {
        "images": int(sum(len(b.rows) for b in blocks)),
        "duplicates": len(rows),
        "exact": sum(r["kind"] == "exact" for r in rows),
        "near": sum(r["kind"] == "near" for r in rows),
        "threshold": threshold,
    }
    if output:
        from capfilt.rethreshold import rethreshold

        drop: dict[str, set[str]] = {}
        for r in rows:
            drop.setdefault(r["shard"], set()).add(r["key"])
        path = OutputFolder(output).url_of(TABLE)
        earlier = _read_table(path)
        if earlier is not None and earlier != rows and not fresh:
            # its finished shards were cut with that table: resuming would mix two dedup passes
            raise ValueError(
                f"{output} holds a dedup run with other duplicates ({len(earlier)} rows, now {len(rows)}: another "
                "threshold or source run); use another --output, or --fresh to redo it"
            )
        result["summary"] = rethreshold(run, output, fresh=fresh, drop=drop)
        write_table(rows, path)  # (after the run: its --fresh sweep would delete it)
    return result


def _read_table(path: str) -> list[dict] | None:
    data = read_file(path)
    return None if data is None else pq.read_table(io.BytesIO(data)).to_pylist()
