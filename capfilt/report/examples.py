"""Choosing the report's example samples: the categories (`capfilt report --show`), their order, and
the image bytes of the chosen samples, as thumbnails."""

from __future__ import annotations

import base64
import io
import logging
import math
import random
from functools import cache

from capfilt.report.markup import finite
from capfilt.report.run import Run

log = logging.getLogger(__name__)

# Example categories (`capfilt report --show`), in the order the page lists them.
CATEGORIES = {
    "web-rejected-synthetic-kept": "the filter rejected the web text (below its threshold) and kept a synthetic "
    "caption: the BLIP paper's figure; clearest cases first",
    "web-kept": "the filter kept the web text; highest-scoring first",
    "synthetic-selected": "a synthetic caption became the sample's caption ({key}.txt): LAION-COCO's "
    "output; highest-ranked first",
    "borderline": "a text scored nearest its threshold, on either side; nearest first",
    "rejected": "no text of the sample was kept (the sample is dropped); a seeded draw",
    "failed": "the sample failed before scoring (unreadable image, broken tar, ...): one line each, "
    "every failure reason first",
    "random": "a seeded draw of all samples",
}
DEFAULT_SHOW = ("web-rejected-synthetic-kept",)
# decide.mode laion_coco keeps the web text beside the top caption (no filter rejects it): its figure
# is the caption that replaced the web text as {key}.txt.
LAION_DEFAULT_SHOW = ("synthetic-selected",)

THUMB = 128  # px: the image column of a card


@cache
def below() -> dict[str, str]:
    """The score each below-threshold reason names (records.BELOW_THRESHOLD, read when a report is
    built: records loads pyarrow, which `capfilt --help` must not)."""
    from capfilt.records import BELOW_THRESHOLD

    return {reason: score for score, reason in BELOW_THRESHOLD.items()}


def filter_rejections() -> set[str]:
    """The reasons the filter rejects a text with: below a threshold, or on ITC alone in the cascade."""
    from capfilt.records import Reason

    return {*below(), Reason.ITC_BELOW_CASCADE}


def parse_show(values: list[str] | tuple[str, ...] | None) -> list[str]:
    """``--show`` values (repeatable, each a comma list) -> categories in the given order, once each.
    An unknown name raises ValueError naming the valid ones."""
    chosen: list[str] = []
    for value in values or DEFAULT_SHOW:
        for name in (part.strip() for part in value.split(",")):
            if not name:
                continue
            if name not in CATEGORIES:
                raise ValueError(f"unknown report category {name!r}; valid: {', '.join(CATEGORIES)}")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ValueError(f"no report category given; valid: {', '.join(CATEGORIES)}")
    return chosen


def select(run: Run, category: str, n: int, seed: int) -> tuple[list[tuple], int]:
    """(the first ``n`` samples of a category, in its order; how many samples it has)."""
    rank = run.rank
    ids = sorted(run.samples)

    def web(rows):
        return next((r for r in rows if r["source"] == "web"), None)

    def value(row, score=rank):
        return row[score] if row is not None and score and finite(row[score]) else None

    if category == "web-rejected-synthetic-kept":
        chosen = []
        for i in ids:
            rows = run.samples[i]
            w = web(rows)
            if w is None or w["kept"] or w["reason"] not in filter_rejections():
                continue
            score = below().get(w["reason"], "itc")  # the filter score that rejected the web text
            kept_syn = [r for r in rows if r["source"] == "synthetic" and r["kept"]]
            if not kept_syn:
                continue
            best = max((v for r in kept_syn if (v := value(r, score)) is not None), default=None)
            gap = best - value(w, score) if best is not None and value(w, score) is not None else -math.inf
            chosen.append((-gap, i))  # the largest gap between the kept caption and the web text first
        ordered = [i for _, i in sorted(chosen)]
    elif category == "web-kept":
        chosen = []
        for i in ids:
            w = web(run.samples[i])
            if w is not None and w["kept"]:
                # Furthest above its threshold first (by the ranking score where no threshold is set).
                strength = run.margin(w) if run.margin(w) is not None else value(w)
                chosen.append((-strength if strength is not None else math.inf, i))
        ordered = [i for _, i in sorted(chosen)]
    elif category == "synthetic-selected":
        chosen = []
        for i in ids:
            sel = next((r for r in run.samples[i] if r["selected"]), None)
            if sel is not None and sel["source"] == "synthetic":
                strength = value(sel)
                chosen.append((-strength if strength is not None else math.inf, i))
        ordered = [i for _, i in sorted(chosen)]
    elif category == "borderline":
        chosen = []
        for i in ids:
            margins = [abs(m) for r in run.samples[i] if (m := run.margin(r)) is not None]
            if margins:
                chosen.append((min(margins), i))
        ordered = [i for _, i in sorted(chosen)]
    elif category == "failed":
        by_reason: dict[str, list] = {}
        for i in ids:
            head = run.samples[i][0]
            if head["candidate"] == -1:
                by_reason.setdefault(head["reason"], []).append(i)
        # Round robin over the reasons (most frequent first), so the first lines cover every reason.
        queues = sorted(by_reason.values(), key=lambda q: (-len(q), q[0]))
        ordered = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
    elif category in ("rejected", "random"):
        ordered = [i for i in ids if category == "random" or run.samples[i][0]["sample_status"] == "rejected"]
        random.Random(seed).shuffle(ordered)
    else:
        raise ValueError(f"unknown report category {category!r}; valid: {', '.join(CATEGORIES)}")
    return ordered[:n], len(ordered)


def images_for(run: Run, wanted: set) -> dict:
    """Image bytes of the wanted (shard, key, occurrence) from the run's input shards."""
    from capfilt.io.shards import expand_shards, image_member, read_shard, shard_id

    found: dict = {}
    shards = {s for s, _, _ in wanted}
    if not shards:
        return found
    problems: list[str] = []
    try:
        urls = expand_shards(run.config["input"])
    except (FileNotFoundError, ValueError, KeyError) as err:  # inputs moved away: cards show no image
        urls, problems = [], [f"{err}"]
    for url in urls:
        sid = shard_id(url)
        if sid not in shards:
            continue
        left = {w for w in wanted if w[0] == sid}
        try:
            for s in read_shard(url):
                if (s.shard, s.key, s.occurrence) in left:
                    member = image_member(s)
                    found[(s.shard, s.key, s.occurrence)] = member[1] if member else None
                    left.discard((s.shard, s.key, s.occurrence))
                    if not left:
                        break
        except Exception as err:  # noqa: BLE001 - a report shows what it can; missing images show blank
            problems.append(f"{url}: {' '.join(str(err).split()) or type(err).__name__}")
    if problems:  # once per report, not once per card: the cards then say "no image"
        missing = len(wanted) - sum(v is not None for v in found.values())
        log.warning(
            "report: %d of %d example images could not be read from the run's input shards (%s); "
            "their cards show no image",
            missing,
            len(wanted),
            "; ".join(problems[:3]) + (f"; … ({len(problems) - 3} more)" if len(problems) > 3 else ""),
        )
    return found


def thumb(data: bytes | None) -> str:
    from capfilt.io.images import DecodeLimits, ImageDecodeError, decode_image

    if not data:
        return ""
    try:
        img = decode_image(data, DecodeLimits(max_side=THUMB, min_side=1))
    except ImageDecodeError:
        return ""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
