"""What the writers need from an input sample beyond its members: its .json parsed, and the LAION
metadata columns it carries (the img2dataset parquet sidecar's row, else the sample's .json)."""

from __future__ import annotations

import json

from capfilt.records import LAION_PASSTHROUGH, laion_value


def parse_json(text: str | None):
    """A sample's .json as a value; None when there is none or it is not JSON."""
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def laion_meta(sidecar: dict | None, source_json: str | None) -> dict:
    """The LAION_PASSTHROUGH columns of one sample, typed as LAION_SCHEMA has them (None where the
    input has no usable value): from its sidecar row first, else from its .json, the order in
    which `io.shards.url_of` looks for the URL."""
    meta = parse_json(source_json)
    meta = meta if isinstance(meta, dict) else {}
    out = {}
    for column in LAION_PASSTHROUGH:
        value = laion_value(column, (sidecar or {}).get(column))
        out[column] = laion_value(column, meta.get(column)) if value is None else value
    return out
