"""From raw shard samples to pipeline rows, and the candidate texts of a row.

A row is one input sample as plain columns (strings, bytes, numbers), so the same rows flow
through every runner's shard worker (runners/worker.py).
"""

from __future__ import annotations

from capfilt.io.rows import laion_meta
from capfilt.io.shards import RawSample, image_member, text_of, url_of
from capfilt.records import Reason, candidates, key_seed

ROW_COLUMNS = (
    "shard",
    "key",
    "occurrence",
    "seed",
    "url",
    "image_ext",
    "image_bytes",
    "web_text",
    "web_reason",
    "source_json",
    "laion_meta",
    "failure",
    "detail",
)


def raw_to_row(sample: RawSample, run_seed: int, max_text_bytes: int) -> dict:
    image = image_member(sample)
    web_text, web_reason = text_of(sample, max_bytes=max_text_bytes)
    failure, detail = sample.failure or "", sample.detail or ""
    if not failure and image is None:
        failure, detail = Reason.MISSING_IMAGE, f"no image member among {sorted(sample.members)}"
    source_json = sample.members.get("json")
    source_json = source_json.decode("utf-8", "replace") if source_json else None
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
        "source_json": source_json,
        "laion_meta": laion_meta(sample.sidecar, source_json),  # LAION's WIDTH, HEIGHT, hash, ... if given
        "failure": failure,
        "detail": detail,
    }


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
