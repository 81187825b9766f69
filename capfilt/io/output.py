"""What goes into each of a shard's files: its ledger rows, each kept sample's tar members (image,
caption, JSON), its LAION row (`render` puts one batch's share together); nothing here touches a
file. Where the files go and how they are committed is io/folder.py, the streaming writer that
appends the shares is io/shard_writer.py, and the files' names are io/names.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

from capfilt.io.embeddings import embedding_rows
from capfilt.io.rows import parse_json
from capfilt.io.sample_keys import check_member_name, key_warning
from capfilt.records import FAILED, IMAGE_SCORES, KEPT, LAION_PASSTHROUGH, SYNTHETIC, Reason, row_candidates


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
