"""The outputs of one shard: cleaned tar, ledger, stats, LAION parquet, and its completion marker.

What goes into each file is here (ledger rows, the sample's JSON, the LAION row); shard_writer.py
streams them out. The output location is a local path or any fsspec URL (``s3://bucket/prefix``,
``gs://…``, ``memory://…``; `location`):

* a local path (or ``file://``): every file is written under a temporary name, fsynced and renamed
  into place (os.replace); the marker is renamed last;
* any other file system (object stores have no atomic rename): every file is written directly under
  its final name (an S3 / GCS object appears only once its upload completes, so never half of
  one), and the marker is written last, after the others are in place.

Either way a shard with a marker is complete, readers and resume trust only the marker, and a
shard without one is redone (a rewrite gives the same bytes). Credentials and endpoints come from
the file system's usual configuration: for S3, the AWS variables and files that botocore reads
(``AWS_ENDPOINT_URL`` for an S3-compatible server such as MinIO), or fsspec's
``FSSPEC_S3_ENDPOINT_URL`` style variables (``fsspec.config``).
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from pathlib import Path

import fsspec

from capfilt.io.rows import parse_json
from capfilt.io.shards import key_warning
from capfilt.records import FAILED, IMAGE_SCORES, LAION_PASSTHROUGH, SYNTHETIC, Reason, row_candidates

SUBDIRS = ("shards", "ledger", "stats", "laion", "_done")
TMP_MARK = ".tmp-"
# A clip chain model's embeddings (clip.K.embeddings), in clip-retrieval's layout: row r of
# img_emb/{shard}.npy (and text_emb/{shard}.npy) is row r of metadata/{shard}.parquet.
EMBEDDINGS = ("embeddings/img_emb", "embeddings/text_emb", "embeddings/metadata")


def location(out: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem | None, str | Path]:
    """(file system, root) of an output location: ``(None, Path)`` for a local path or a
    ``file://`` URL (written with pathlib, temporary names and os.replace), else the fsspec file
    system (``fsspec.core.url_to_fs``) and the root path inside it (no protocol)."""
    if isinstance(out, Path):
        return None, out
    url = os.fspath(out)
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return None, Path(fsspec.core.url_to_fs(url)[1] if protocol else url)
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def join(root: str | Path, *parts: str) -> str | Path:
    """``root/parts`` for a local Path or a path inside an fsspec file system."""
    return root.joinpath(*parts) if isinstance(root, Path) else posixpath.join(root, *parts)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole small file: on a local path under a temporary name, fsynced, renamed into
    place; elsewhere (an fsspec URL) as one put of the final object, which is all-or-nothing."""
    fs, path = location(path)
    if fs is not None:
        fs.pipe_file(path, data)
        return
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# The name of every file capfilt writes in each of its folders: "{shard}{suffix}" (plus, locally,
# a temporary "{name}.tmp-XXXXXXXX" while it is written). The one place this rule is declared.
OWN_SUFFIXES = {
    "shards": ".tar",
    "ledger": ".parquet",
    "stats": ".json",
    "laion": ".parquet",
    "_done": ".done",
    **{sub: suffix for sub, suffix in zip(EMBEDDINGS, (".npy", ".npy", ".parquet"))},
}
OWN_FOLDERS = (*SUBDIRS, *EMBEDDINGS)
_SHARD_FILES = {sub: suffix for sub, suffix in OWN_SUFFIXES.items() if sub != "_done"}
_TMP_TAIL = re.compile(rf"{re.escape(TMP_MARK)}[0-9a-f]{{8}}$")
# capfilt's files at the top of an output: the run record, the summary, the run lock (io/run_lock.py).
ROOT_FILES = ("run.json", "summary.json", "duplicates.parquet")  # (the last: `capfilt dedup`'s table)
LOCK_FILE = "run.lock"
SIZES_FILE = "sizes.json"  # in shards/: {tar name: samples}, as webdataset and open_clip read it


def own_shard(sub: str, name: str) -> tuple[str | None, bool]:
    """(shard id, temporary?) of a file named ``name`` in capfilt's folder ``sub`` when it has the
    name capfilt gives that shard's file there (``{id}.tar`` in shards/, ``{id}.parquet``
    in ledger/, ..., or such a name plus ``.tmp-XXXXXXXX`` while being written); (None, False) else."""
    tail = _TMP_TAIL.search(name)
    base = name[: tail.start()] if tail else name
    suffix = OWN_SUFFIXES.get(sub)
    if suffix and base.endswith(suffix) and len(base) > len(suffix):
        return base[: -len(suffix)], bool(tail)
    return None, False


def is_own(sub: str, name: str, shards) -> bool:
    """Whether the file ``name`` in ``sub`` ("" for the output's top) is one this output's run
    wrote: a file of one of ``shards`` (the shard ids its run.json records), final or temporary,
    or at the top run.json / summary.json. ``shards`` None (a run.json of a capfilt that did not
    record its shards): every name capfilt gives counts."""
    if not sub:
        return name in ROOT_FILES
    if sub == "shards" and _TMP_TAIL.sub("", name) == SIZES_FILE:  # the run's, rewritten at its summary
        return True
    shard, _ = own_shard(sub, name)
    return shard is not None and (shards is None or shard in shards)


def sweep_partials(out: str | os.PathLike, shards=None) -> list:
    """Remove what a crashed run of this output left behind: only files of ``shards`` (the shard
    ids its run.json records writing; None: every name capfilt gives, for a run.json that records
    none) and temporaries of run.json / summary.json.

    Local: temporary files (`{name}.tmp-XXXXXXXX` of those files), never a user's file that
    happens to contain .tmp-. Elsewhere (no temporary names; files go straight to their final
    names): also a shard's own files (``shards/{id}.tar``, ``ledger/{id}.parquet``, …) where
    ``_done/{id}.done`` is absent, since they are the partial outputs of a shard that never
    committed."""
    shards = None if shards is None else set(shards)
    fs, root = location(out)
    if fs is not None:
        return _sweep_fs(fs, root, shards)
    swept = []
    for sub in ("", *OWN_FOLDERS):
        folder = root / sub if sub else root
        for p in folder.glob(f"*{TMP_MARK}*") if folder.is_dir() else ():
            tail = _TMP_TAIL.search(p.name)
            stale = tail and (p.name[: tail.start()] in ROOT_FILES if not sub else is_own(sub, p.name, shards))
            if stale and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                swept.append(p)
    return swept


def list_files(fs, folder: str) -> list[str] | None:
    """Paths of the plain files directly in ``folder`` (None when there is no such folder)."""
    fs.invalidate_cache(folder)  # a listing cached by this process may predate another's writes
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return None
    return [e["name"] for e in entries if e.get("type") == "file"]


def _sweep_fs(fs, root: str, shards) -> list[str]:
    done = {
        posixpath.basename(p)[: -len(".done")] for p in list_files(fs, join(root, "_done")) or [] if p.endswith(".done")
    }
    swept = []
    for sub in ("", *OWN_FOLDERS):
        for path in list_files(fs, join(root, sub) if sub else root) or []:
            name = posixpath.basename(path)
            tail = _TMP_TAIL.search(name)
            if not sub:
                stale = bool(tail) and name[: tail.start()] in ROOT_FILES
            else:  # a marker is never stale; a shard's other files are until its marker is there
                shard, tmp = own_shard(sub, name)
                stale = sub in _SHARD_FILES and is_own(sub, name, shards) and (tmp or shard not in done)
            if stale:
                fs.rm_file(path)
                swept.append(fs.unstrip_protocol(path))
    return swept


def _round(value):
    return None if value is None else float(value)


def ledger_rows(row: dict, i: int) -> list[dict]:
    base = {
        "shard": row["shard"][i],
        "key": row["key"][i],
        "occurrence": int(row["occurrence"][i]),
        "key_warning": key_warning(row["key"][i]),
        "sample_status": row["status"][i] if not row["failure"][i] else FAILED,
        "seed": int(row["seed"][i]),
        "url": row["url"][i],
        **{s: (None if row["failure"][i] else _round(row[s][i])) if s in row else None for s in IMAGE_SCORES},
    }
    if row["failure"][i]:
        return [
            {
                **base,
                "source": None,
                "candidate": -1,
                "text": row["web_text"][i],
                "itm": None,
                "itc": None,
                "clip": None,
                "clip_scores": None,
                "kept": False,
                "reason": row["failure"][i],
                "selected": False,
                "edited_text": None,
                **dict.fromkeys(_CLAIM_FIELDS),
            }
        ]
    edited = row["edited"][i] if "edited" in row else None  # the Edit stage's rewrite of the selected text
    out = []
    for j, c in enumerate(row_candidates(row, i)):
        chain = c["clip_scores"]  # one per clip chain model; a one-model chain's is `clip` alone
        out.append(
            {
                **base,
                "source": c["source"],
                "candidate": j,
                "text": c["text"],
                "itm": _round(c["itm"]),
                "itc": _round(c["itc"]),
                "clip": _round(c["clip"]),
                "clip_scores": [_round(v) for v in chain] if chain is not None and len(chain) > 1 else None,
                "kept": bool(row["kept"][i][j]),
                "reason": row["reasons"][i][j],
                "selected": j == row["selected"][i],
                "edited_text": edited if j == row["selected"][i] else None,
                **_claim_fields(c, row, i, j),
            }
        )
    return out


_CLAIM_FIELDS = ("claims", "claim_scores", "claim_supported", "trimmed_text")  # the claims section's columns


def _claim_fields(c: dict, row: dict, i: int, j: int) -> dict:
    """Candidate j's claims, their scores and verdicts (Decide's ``claim_supported``), and its
    trimmed text (Decide's ``trimmed``); nulls for a text not verified claim by claim."""
    supported = (row["claim_supported"][i] if "claim_supported" in row else None) or {}
    trimmed = (row["trimmed"][i] if "trimmed" in row else None) or {}
    scores = c.get("claim_scores")
    return {
        "claims": c.get("claims"),
        "claim_scores": None if scores is None else [_round(v) for v in scores],
        "claim_supported": supported[j] if supported else None,
        "trimmed_text": trimmed[j] if trimmed else None,
    }


def sample_json(row: dict, i: int, ledger: list[dict]) -> dict:
    # A text trimmed to its supported claims (claims.policy trim) is written as trimmed.
    texts = [
        {
            "text": r.get("trimmed_text") or r["text"],
            "source": r["source"],
            "itm": r["itm"],
            "itc": r["itc"],
            "clip": r["clip"],
            **({"text_original": r["text"]} if r.get("trimmed_text") else {}),
        }
        for r in ledger
        if r["kept"]
    ]
    selected = next(r for r in ledger if r["selected"])
    # With `edit`: the caption is the edited text (the selected one's own when the edit came out
    # empty) and caption_original the selected text as scored; texts keep the originals.
    edit = {} if selected["edited_text"] is None else {"caption_original": selected["text"]}
    return {
        "key": row["key"][i],
        "url": row["url"][i],
        "caption": selected["edited_text"] or selected.get("trimmed_text") or selected["text"],
        **edit,
        "texts": texts,
        "web_text": row["web_text"][i],
        "source_json": parse_json(row["source_json"][i]),
    }


def laion_row(row: dict, i: int, ledger: list[dict]) -> dict:
    """LAION-COCO's published columns for one scored image (records.LAION_SCHEMA).

    all_captions / all_similarities: every synthetic caption the clip chain's first model scored,
    with that score (LAION-COCO's all_similarities are its first model's, ViT-L/14, over all 40
    captions); top_caption / similarity: the caption the chain's last model scores highest, with
    that score; with `edit` set and that caption selected, its rewrite (LAION-COCO published the
    T5-repaired winner). WIDTH, HEIGHT, hash, pwatermark, punsafe: the input's own (its img2dataset
    sidecar or .json), null where it has none."""

    def first(r):  # the chain's first model's score (a one-model chain's is `clip`)
        return r["clip_scores"][0] if r["clip_scores"] is not None else r["clip"]

    syn = [r for r in ledger if r["source"] == SYNTHETIC and first(r) is not None]
    best = max((r for r in syn if r["clip"] is not None), key=lambda r: r["clip"], default=None)
    meta = (row["laion_meta"][i] if "laion_meta" in row else None) or {}
    return {
        "key": row["key"][i],
        "URL": row["url"][i],
        # LAION writes the web text as it came, "" for an empty one: only a missing text is null.
        "TEXT": "" if _web_reason(row, i) == Reason.WEB_TEXT_EMPTY else row["web_text"][i],
        "top_caption": (best.get("edited_text") or best["text"]) if best else None,
        "all_captions": [r["text"] for r in syn],
        "all_similarities": [first(r) for r in syn],
        "similarity": best["clip"] if best else None,
        **{column: meta.get(column) for column in LAION_PASSTHROUGH},
        # computed by the run (`quality`, `watermark`; which wins over the input's is their `prefer`)
        **{s: float(row[s][i]) for s in ("punsafe", "pwatermark") if s in row and row[s][i] is not None},
    }


def _web_reason(row: dict, i: int) -> str:
    return row["web_reason"][i] if "web_reason" in row else ""


def write_shard(
    out: str | os.PathLike, shard: str, rows: list[dict], laion: bool = False, source: str | None = None
) -> dict:
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


def shard_writer(out: str | os.PathLike, shard: str, laion: bool = False, source: str | None = None):
    """A `ShardWriter` for this output layout: add(batch)... then commit() (marker last)."""
    from capfilt.io.shard_writer import ShardWriter

    return ShardWriter(out, shard, SUBDIRS, TMP_MARK, laion=laion, source=source)
