"""From raw shard samples to pipeline rows, and the candidate texts of a row.

A row is one input sample as plain columns (strings, bytes, numbers), so the same rows flow
through the local runner and through Ray Data.
"""

from __future__ import annotations

import json

from capfilt.io.shards import RawSample, image_member, text_of, url_of
from capfilt.records import SYNTHETIC, WEB, Reason, key_seed

ROW_COLUMNS = (
    "shard", "key", "occurrence", "seed", "url", "image_ext", "image_bytes",
    "web_text", "web_reason", "source_json", "failure", "detail",
)


def raw_to_row(sample: RawSample, run_seed: int, max_text_bytes: int) -> dict:
    image = image_member(sample)
    web_text, web_reason = text_of(sample, max_bytes=max_text_bytes)
    failure, detail = sample.failure or "", sample.detail or ""
    if not failure and image is None:
        failure, detail = Reason.MISSING_IMAGE, f"no image member among {sorted(sample.members)}"
    source_json = sample.members.get("json")
    return {
        "shard": sample.shard,
        "key": sample.key,
        "occurrence": sample.occurrence,
        "seed": key_seed(run_seed, sample.key),
        "url": url_of(sample),
        "image_ext": image[0] if image else None,
        "image_bytes": image[1] if image else None,
        "web_text": web_text,
        "web_reason": web_reason or "",
        "source_json": source_json.decode("utf-8", "replace") if source_json else None,
        "failure": failure,
        "detail": detail,
    }


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def candidates(web_text: str | None, web_reason: str, captions: list[str] | None) -> list[dict]:
    """Candidate 0 is the web text, 1..K the synthetic captions; `reason` is set when a text is
    rejected before any model scores it (missing/empty/too long web text, empty or duplicate caption)."""
    out = [{"source": WEB, "text": web_text, "reason": web_reason or ""}]
    seen = {_norm(web_text)} if web_text and not web_reason else set()
    for caption in captions or []:
        reason = ""
        if not caption.strip():
            reason = Reason.CAPTION_EMPTY
        elif _norm(caption) in seen:
            reason = Reason.DUPLICATE_TEXT
        seen.add(_norm(caption))
        out.append({"source": SYNTHETIC, "text": caption, "reason": reason})
    return out


def scorable(batch: dict) -> tuple[list[int], list[list[int]], list[list[str]]]:
    """For a batch: the rows still alive, and per such row the candidate indices and texts to score."""
    rows, index, texts = [], [], []
    for i in range(len(batch["key"])):
        if batch["failure"][i]:
            continue
        cands = candidates(batch["web_text"][i], batch["web_reason"][i], batch["captions"][i])
        live = [j for j, c in enumerate(cands) if not c["reason"]]
        rows.append(i)
        index.append(live)
        texts.append([cands[j]["text"] for j in live])
    return rows, index, texts


def parse_json(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
