"""The outputs of one shard: cleaned tar, ledger, stats, LAION parquet, and its completion marker.

Every file is written under a temporary name and renamed into place; the marker is renamed last,
so a shard with a marker is complete and a shard without one is redone on resume.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.records import FAILED, KEPT, LEDGER_SCHEMA, REJECTED, Reason, empty_stats
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
    """Remove temporary files a crashed run left behind."""
    swept = []
    for sub in SUBDIRS:
        for p in (out / sub).glob(f"*{TMP_MARK}*"):
            p.unlink(missing_ok=True)
            swept.append(p)
    for p in out.glob(f"*{TMP_MARK}*"):
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


def shard_stats(shard: str, ledger: list[dict], details: dict[str, str]) -> dict:
    stats = empty_stats(shard)
    samples = {}
    for r in ledger:
        samples.setdefault((r["key"], r["occurrence"]), r)
    for r in samples.values():
        status = r["sample_status"]
        stats["input"] += 1
        stats[status] += 1
        if status == FAILED:
            stats["failed_by_reason"][r["reason"]] = stats["failed_by_reason"].get(r["reason"], 0) + 1
        elif status == REJECTED:
            stats["rejected_by_reason"][Reason.NO_TEXT_KEPT] = stats["rejected_by_reason"].get(Reason.NO_TEXT_KEPT, 0) + 1
    by_reason: dict[str, Counter] = {"web": Counter(), "synthetic": Counter()}
    for r in ledger:
        if r["source"] is None:
            continue
        stats["candidates"][r["source"]]["kept" if r["kept"] else "rejected"] += 1
        if not r["kept"]:
            by_reason[r["source"]][r["reason"]] += 1
    stats["candidate_rejections_by_reason"] = {s: dict(sorted(c.items())) for s, c in by_reason.items()}
    stats["failure_examples"] = details
    return stats


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_json(row: dict, i: int, ledger: list[dict]) -> dict:
    texts = [{"text": r["text"], "source": r["source"], "itm": r["itm"], "itc": r["itc"], "clip": r["clip"]}
             for r in ledger if r["kept"]]
    selected = next(r["text"] for r in ledger if r["selected"])
    return {"key": row["key"][i], "url": row["url"][i], "caption": selected, "texts": texts,
            "web_text": row["web_text"][i], "source_json": parse_json(row["source_json"][i])}


def laion_table(rows: list[tuple[dict, int, list[dict]]]) -> pa.Table:
    """LAION-COCO's published columns, one row per scored image."""
    out = {"key": [], "URL": [], "TEXT": [], "top_caption": [], "all_captions": [], "all_similarities": [],
           "similarity": []}
    for row, i, ledger in rows:
        if row["failure"][i]:
            continue
        syn = [r for r in ledger if r["source"] == "synthetic" and r["clip"] is not None]
        best = max(syn, key=lambda r: r["clip"], default=None)
        out["key"].append(row["key"][i])
        out["URL"].append(row["url"][i])
        out["TEXT"].append(row["web_text"][i])
        out["top_caption"].append(best["text"] if best else None)
        out["all_captions"].append([r["text"] for r in syn])
        out["all_similarities"].append([r["clip"] for r in syn])
        out["similarity"].append(best["clip"] if best else None)
    return pa.table(out)


def write_shard(out: Path, shard: str, rows: list[dict], laion: bool = False) -> dict:
    """Commit one shard from its decided rows (column dicts, as the stages return them)."""
    ledger_all, members, laion_rows, details = [], [], [], {}
    for batch in rows:
        for i in range(len(batch["key"])):
            ledger = ledger_rows(batch, i)
            ledger_all.extend(ledger)
            if batch["failure"][i]:
                details.setdefault(batch["failure"][i], f"{batch['key'][i]}: {batch['detail'][i]}")
            laion_rows.append((batch, i, ledger))
            if not batch["failure"][i] and batch["status"][i] == KEPT:
                key = batch["key"][i]
                meta = sample_json(batch, i, ledger)
                members += [(f"{key}.{batch['image_ext'][i]}", batch["image_bytes"][i]),
                            (f"{key}.txt", meta["caption"].encode()),
                            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())]
    stats = shard_stats(shard, ledger_all, details)
    for sub in SUBDIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write(out / "shards" / f"{shard}.tar", _tar_bytes(members))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(ledger_all, schema=LEDGER_SCHEMA), sink)
    atomic_write(out / "ledger" / f"{shard}.parquet", sink.getvalue().to_pybytes())
    if laion:
        sink = pa.BufferOutputStream()
        pq.write_table(laion_table(laion_rows), sink)
        atomic_write(out / "laion" / f"{shard}.parquet", sink.getvalue().to_pybytes())
    atomic_write(out / "stats" / f"{shard}.json", json.dumps(stats, indent=1).encode())
    atomic_write(out / "_done" / f"{shard}.done", b"")
    return stats
