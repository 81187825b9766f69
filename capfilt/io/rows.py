"""What the writers need from an input sample beyond its members: its .json parsed, and the LAION
metadata columns it carries (the img2dataset parquet sidecar's row, else the sample's .json)."""

from __future__ import annotations

import json

from capfilt.records import LAION_ALIASES, LAION_PASSTHROUGH, laion_value


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
    which `io.shards.url_of` looks for the URL; under LAION's name first, then img2dataset's
    (records.LAION_ALIASES: original_width, width for WIDTH)."""
    meta = parse_json(source_json)
    meta = meta if isinstance(meta, dict) else {}
    out = {}
    for column in LAION_PASSTHROUGH:
        value = None
        for name in (column, *LAION_ALIASES.get(column, ())):  # LAION's own name, then img2dataset's
            value = laion_value(column, (sidecar or {}).get(name))
            value = laion_value(column, meta.get(name)) if value is None else value
            if value is not None:
                break
        out[column] = value
    return out
