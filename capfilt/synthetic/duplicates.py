"""Planted duplicate images with their truth, for measuring `capfilt dedup`.

A copy of an example's picture goes in later in the corpus under its own key, as one of:

* ``exact``: the same bytes (same decoded pixels: found by the pixel hash);
* ``reencoded``: decoded and saved again as JPEG at quality 60;
* ``resized``: scaled to 80% of its sides;
* ``cropped``: a 5% border cut off each side.

The web text stays the original's (a re-upload's caption is often the same). Every copy comes
after its original in the corpus, so "the first occurrence stays" keeps the original. A pure
function of the seed, like the rest of the world.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from capfilt.synthetic.splits import Example

KINDS = ("exact", "reencoded", "resized", "cropped")


def _copy(image: bytes, kind: str) -> bytes:
    if kind == "exact":
        return image
    im = Image.open(io.BytesIO(image)).convert("RGB")
    quality = 90
    if kind == "reencoded":
        quality = 60
    elif kind == "resized":
        im = im.resize((max(1, round(im.width * 0.8)), max(1, round(im.height * 0.8))), Image.BILINEAR)
    elif kind == "cropped":
        dx, dy = max(1, round(im.width * 0.05)), max(1, round(im.height * 0.05))
        im = im.crop((dx, dy, im.width - dx, im.height - dy))
    else:
        raise ValueError(f"unknown duplicate kind {kind!r} (one of {', '.join(KINDS)})")
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def plant_duplicates(examples: list[Example], share: float = 0.25, seed: int = 0) -> tuple[list[Example], list[dict]]:
    """``examples`` with copies of ``round(share * len(examples))`` of them inserted at random
    places after their originals, the kinds in turn; and the truth, one dict per copy: key,
    duplicate_of (the original's key), kind."""
    rng = np.random.default_rng(seed)
    n = round(share * len(examples))
    picks = sorted(rng.choice(len(examples), size=n, replace=False).tolist()) if n else []
    out, truth = list(examples), []
    for m, p in enumerate(picks):
        original, kind = examples[p], KINDS[m % len(KINDS)]
        copy = dataclasses.replace(original, key=f"{original.key}-{kind}", image=_copy(original.image, kind))
        at = out.index(original)
        out.insert(int(rng.integers(at + 1, len(out) + 1)), copy)
        truth.append({"key": copy.key, "duplicate_of": original.key, "kind": kind})
    return out, truth


def dedup_quality(found: list[dict], truth: list[dict]) -> dict:
    """Precision and recall of a duplicates table against the planted truth: a found row is right
    when its key is a planted copy (of any original: a copy matched to another copy of the same
    picture is right too); recall per kind."""
    planted = {t["key"]: t for t in truth}
    right = [r for r in found if r["key"] in planted]
    keys = {r["key"] for r in found}
    by_kind = {
        kind: sum(t["key"] in keys for t in truth if t["kind"] == kind) / max(1, sum(t["kind"] == kind for t in truth))
        for kind in KINDS
    }
    return {
        "precision": len(right) / len(found) if found else 1.0,
        "recall": len(keys & set(planted)) / len(planted) if planted else 1.0,
        "recall_by_kind": by_kind,
        "found": len(found),
        "planted": len(planted),
    }
