"""The outputs of one shard: cleaned tar, ledger, stats, LAION parquet, and its completion marker.

What goes into each file is here (ledger rows, the sample's JSON, the LAION row); shard_writer.py
streams them to disk. Every file is written under a temporary name and renamed into place; the
marker is renamed last, so a shard with a marker is complete and a shard without one is redone
on resume.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from capfilt.records import FAILED
from capfilt.stages.decide import row_candidates
from capfilt.stages.rows import parse_json

SUBDIRS = ("shards", "ledger", "stats", "laion", "_done")
TMP_MARK = ".tmp-"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sweep_partials(out: Path) -> list[Path]:
    """Remove temporary files a crashed run left behind: only names capfilt itself gives them
    (`{name}.tmp-XXXXXXXX` of its own files), never a user's file that happens to contain .tmp-."""
    swept = []
    own = re.compile(rf"^[^/]+\.(tar|parquet|json|done){re.escape(TMP_MARK)}[0-9a-f]{{8}}$")
    for folder in [out / sub for sub in SUBDIRS] + [out]:
        for p in folder.glob(f"*{TMP_MARK}*"):
            if own.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                swept.append(p)
    return swept


def _round(value):
    return None if value is None else float(value)


def ledger_rows(row: dict, i: int) -> list[dict]:
    base = {"shard": row["shard"][i], "key": row["key"][i], "occurrence": int(row["occurrence"][i]),
            "sample_status": row["status"][i] if not row["failure"][i] else FAILED,
            "seed": int(row["seed"][i]), "url": row["url"][i]}
    if row["failure"][i]:
        return [{**base, "source": None, "candidate": -1, "text": row["web_text"][i], "itm": None, "itc": None,
                 "clip": None, "kept": False, "reason": row["failure"][i], "selected": False}]
    out = []
    for j, c in enumerate(row_candidates(row, i)):
        out.append({**base, "source": c["source"], "candidate": j, "text": c["text"], "itm": _round(c["itm"]),
                    "itc": _round(c["itc"]), "clip": _round(c["clip"]), "kept": bool(row["kept"][i][j]),
                    "reason": row["reasons"][i][j], "selected": j == row["selected"][i]})
    return out


def sample_json(row: dict, i: int, ledger: list[dict]) -> dict:
    texts = [{"text": r["text"], "source": r["source"], "itm": r["itm"], "itc": r["itc"], "clip": r["clip"]}
             for r in ledger if r["kept"]]
    selected = next(r["text"] for r in ledger if r["selected"])
    return {"key": row["key"][i], "url": row["url"][i], "caption": selected, "texts": texts,
            "web_text": row["web_text"][i], "source_json": parse_json(row["source_json"][i])}


def laion_row(row: dict, i: int, ledger: list[dict]) -> dict:
    """LAION-COCO's published columns for one scored image (records.LAION_SCHEMA)."""
    syn = [r for r in ledger if r["source"] == "synthetic" and r["clip"] is not None]
    best = max(syn, key=lambda r: r["clip"], default=None)
    return {"key": row["key"][i], "URL": row["url"][i], "TEXT": row["web_text"][i],
            "top_caption": best["text"] if best else None, "all_captions": [r["text"] for r in syn],
            "all_similarities": [r["clip"] for r in syn], "similarity": best["clip"] if best else None}


def write_shard(out: Path, shard: str, rows: list[dict], laion: bool = False, source: str | None = None) -> dict:
    """Commit one shard from its decided rows (column dicts, as the stages return them).

    ``source`` is the input shard's url: its img2dataset sidecar / ``_stats.json`` give the
    shard's ``upstream_failed`` counts (samples attempted upstream that never reached the tar).
    A caller that has the batches one at a time streams them through `shard_writer` instead.
    """
    writer = shard_writer(out, shard, laion=laion, source=source)
    try:
        for batch in rows:
            writer.add(batch)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def shard_writer(out: Path, shard: str, laion: bool = False, source: str | None = None):
    """A `ShardWriter` for this output layout: add(batch)... then commit() (marker last)."""
    from capfilt.io.shard_writer import ShardWriter

    return ShardWriter(out, shard, SUBDIRS, TMP_MARK, laion=laion, source=source)
