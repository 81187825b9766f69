"""`capfilt report RUN_OR_LOOP_DIR`: one self-contained HTML page about a run (or a bootstrap loop).

The page, top to bottom:
- a header: the run's date and host, package versions, the models with their identities as
  run.json records them (preset / hub id + revision / path, sha256 of the weights), the decide
  thresholds, and the whole resolved config (collapsed);
- for a loop directory, the rounds table (round first, recall@1 / captioning metrics with their
  change over round 0, what CapFilt kept, the calibrated thresholds, the noise of the data);
- counts, rejections by reason, and score histograms (matplotlib, one panel per source, kept and
  rejected stacked, the threshold as a dashed line);
- example samples by category (``--show``): like the BLIP paper's figure, each card has the
  image in a fixed column and, beside it, every text with its source, scores and why it was kept
  or rejected (kept green, rejected red); failed samples get one line each.

Images are embedded as base64 JPEG thumbnails and charts as inline SVG: no external URL, no
script, so the file can be mailed around. The same run gives the same bytes, apart from the
"report written" date (``date=False`` / ``--no-date`` leaves it out; SOURCE_DATE_EPOCH fixes it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import random
from datetime import datetime, timezone
from pathlib import Path

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

log = logging.getLogger(__name__)
SCORES = ("itm", "itc", "clip")
THUMB = 128  # px: the image column of a card

# Why a sample failed / a text was rejected, in words (records.Reason values).
REASON_TEXT = {
    "clip_below_min_score": "below a CLIP chain model's min_score",
    "not_in_clip_top_k": "outside a CLIP chain model's keep_top best captions",
    "missing_image": "no image member for the key",
    "empty_image_file": "zero-byte image member",
    "not_an_image": "the bytes are not an image",
    "truncated_image": "image data ends early",
    "corrupt_image": "image header readable, pixel data broken",
    "image_too_small": "image below decode.min_side",
    "image_too_large": "image over decode.max_pixels",
    "unsupported_image_mode": "pixel format not convertible to RGB",
    "duplicate_key": "key already seen earlier in the shard",
    "truncated_tar": "the tar ends inside this sample",
    "unsafe_key": "key unusable as a tar member name",
    "nonfinite_score": "a model returned NaN or inf",
    "model_error": "a model stage raised for this sample's batch",
    "web_text_missing": "no web text in the sample",
    "web_text_empty": "the web text is empty",
    "web_text_not_utf8": "the web text is not UTF-8",
    "web_text_too_long": "the web text is over decode.max_text_bytes",
    "caption_empty": "the captioner wrote nothing",
    "duplicate_text": "same text as an earlier candidate",
    "not_in_top_m": "passed its threshold, outside the top-m synthetic captions",
    "claim_unsupported": "a claim of the text scored below claims.threshold",
    "no_claim_supported": "no claim of the text scored at or above claims.threshold",
    "no_text_kept": "no text of the sample was kept",
    "aesthetic_below_min": "the image's aesthetic score is below decide.aesthetic.min",
    "unsafe": "the NSFW detector's probability (punsafe) is above decide.punsafe.max",
    "watermarked": "the watermark detector's probability (pwatermark) is above decide.pwatermark.max",
    "near_duplicate": "the same or a near-identical image came earlier in the run (capfilt dedup)",
}
_BELOW = {"itm_below_threshold": "itm", "itc_below_threshold": "itc", "clip_below_threshold": "clip"}
_FILTER_REJECTIONS = {*_BELOW, "itc_below_cascade"}

CSS = (
    """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;background:#f6f6f4}
main{max-width:1240px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:30px 0 8px}h3{font-size:15px;margin:18px 0 6px}
p.note{color:#555;font-size:13px;margin:4px 0 10px}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:4px 0}
td,th{border:1px solid #d6d6d6;padding:4px 8px;font-size:13px;text-align:left;vertical-align:top}
th{background:#ecece8;font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.nowrap{white-space:nowrap}
table.kv th{text-align:left;width:150px}
td.wrap{overflow-wrap:anywhere}.hash{white-space:nowrap}
.scroll{max-width:100%;overflow-x:auto}table.rounds td,table.rounds th{font-size:12.5px;padding:4px 6px}
table.rounds th{white-space:normal;vertical-align:bottom}table.rounds td.trained{min-width:130px}
.up{color:#1f7a34;font-size:11px;margin-left:4px}.down{color:#b02a2a;font-size:11px;margin-left:4px}
details{margin:8px 0}summary{cursor:pointer;font-size:13px;color:#333}
pre{background:#fff;border:1px solid #ddd;padding:8px 10px;font-size:12px;overflow-x:auto;max-height:480px}
.row{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}.row>div{max-width:100%}
.charts{display:flex;flex-direction:column;gap:10px}
.charts svg{width:100%;max-width:720px;height:auto;display:block;background:#fff;border:1px solid #e2e2e2}
nav.cats{font-size:13px;margin:6px 0 4px;line-height:1.8}
nav.cats a{margin-right:14px;color:#2b55a8;text-decoration:none;white-space:nowrap}
nav.cats a.on{font-weight:700}nav.cats .off{margin-right:14px;color:#777;white-space:nowrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:12px}
.card{display:grid;grid-template-columns:"""
    + str(THUMB)
    + """px minmax(0,1fr);column-gap:12px;row-gap:6px;
 background:#fff;border:1px solid #d8d8d8;border-top:4px solid #999;border-radius:6px;padding:10px;align-items:start}
.card.s-kept{border-top-color:#2e9d44}.card.s-rejected{border-top-color:#d33c3c}
.thumb{width:"""
    + str(THUMB)
    + """px;height:"""
    + str(THUMB)
    + """px;background:#eee;display:flex;align-items:center;
 justify-content:center;color:#888;font-size:11px}
.thumb img{width:100%;height:100%;object-fit:contain;display:block}
.texts{display:flex;flex-direction:column;gap:4px;min-width:0}
.t{font-size:13px;padding:4px 7px;border-radius:4px;overflow-wrap:anywhere}
.t.kept{background:#e3f5e5;border-left:4px solid #2e9d44}.t.rejected{background:#fde6e6;border-left:4px solid #d33c3c}
.t.sel{box-shadow:inset 0 0 0 1px #2e9d44}
.src{display:inline-block;font-size:10.5px;font-weight:600;text-transform:uppercase;letter-spacing:.03em;
 padding:0 5px;border-radius:3px;margin-right:6px;color:#fff;vertical-align:1px}
.src.web{background:#3b6fd4}.src.synthetic{background:#c77812}
.edit{font-size:12.5px;color:#1f4f7a;font-style:italic}
.meta{font-size:11.5px;color:#555;margin-top:2px;font-variant-numeric:tabular-nums}
.verdict{font-weight:600}.t.kept .verdict{color:#1f7a34}.t.rejected .verdict{color:#b02a2a}
.foot{grid-column:1/-1;font-size:11px;color:#777;overflow-wrap:anywhere}
.fails{display:flex;flex-direction:column;gap:3px;background:#fff;border:1px solid #ddd;border-radius:6px;
 padding:6px 10px}
.fail{font-size:12.5px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;border-left:4px solid #888;
 padding:2px 8px}
.fail .reason{font-weight:600;color:#8a1f1f;margin:0 8px}.fail .detail{color:#555}
"""
)


# ---------------------------------------------------------------------------------------- small helpers


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v, digits: int = 3) -> str:
    return "–" if not _finite(v) else f"{v:.{digits}f}"


def _short_path(path: str, base: Path | None = None, keep: int = 3) -> str:
    """A path relative to ``base`` when under it, else its last ``keep`` parts after an ellipsis."""
    if base is not None:
        try:
            return str(Path(path).resolve().relative_to(base.resolve()))
        except (ValueError, OSError):
            pass
    parts = Path(path).parts
    return path if len(parts) <= keep + 1 else "…/" + "/".join(parts[-keep:])


def _table(head: list[str] | None, rows: list[list[tuple[str, str]]], cls: str = "") -> str:
    """``rows``: cells as (html, css class) pairs; html is already escaped. ``head`` None: a
    key-value table whose first cell of each row is its header."""

    def td(v: str, c: str) -> str:
        return f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>"

    out = [f'<table class="{cls}">' if cls else "<table>"]
    if head is not None:
        out.append("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = row if head is not None else row[1:]
        first = "" if head is not None else f"<th>{row[0][0]}</th>"
        out.append("<tr>" + first + "".join(td(v, c) for v, c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


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


# ---------------------------------------------------------------------------------------- the run's data


class _Run:
    """A run directory read once: run.json, summary, ledger grouped into samples, failure details."""

    def __init__(self, run_dir: str | Path):
        from capfilt.io.run_dir import read_ledger, read_run_json, read_run_record, read_stats

        self.dir = run_dir  # a local path or the URL the run was written to (s3://…)
        self.meta = read_run_record(run_dir)
        self.config = self.meta.get("config", {})
        self.decide = self.config.get("decide") or {}
        self.summary = read_run_json(run_dir, "summary.json")
        self.ledger = read_ledger(run_dir)
        self.samples: dict[tuple, list[dict]] = {}
        for r in self.ledger:
            self.samples.setdefault((r["shard"], r["key"], r["occurrence"]), []).append(r)
        for rows in self.samples.values():
            rows.sort(key=lambda r: r["candidate"])
        self.scores = [s for s in SCORES if any(_finite(r[s]) for r in self.ledger)]
        self.digits = {
            s: _decimals([r[s] for r in self.ledger] + [self.limit(src, s) for src in ("web", "synthetic")])
            for s in SCORES
        }
        self.rank = self._rank_score()
        # One example (key: detail) per failure reason and shard, as the stats files keep them.
        self.details: dict[tuple, str] = {}
        self.failure_examples: dict[str, str] = {}
        for stats in read_stats(run_dir):
            for reason, example in (stats.get("failure_examples") or {}).items():
                key, _, detail = str(example).partition(": ")
                self.details[(stats.get("shard"), key, reason)] = detail
                self.failure_examples.setdefault(reason, str(example))

    def limit(self, source: str, score: str) -> float | None:
        value = (self.decide.get(source) or {}).get(score)
        return value if _finite(value) else None

    def _rank_score(self) -> str | None:
        """The score texts are ranked by (decide.rank_by; auto: CLIP where computed, else ITM, else ITC)."""
        if self.decide.get("mode") == "laion_coco":
            return "clip"
        if self.decide.get("rank_by") not in (None, "auto"):
            return self.decide["rank_by"]
        return next((s for s in ("clip", "itm", "itc") if s in self.scores), None)

    def margin(self, row: dict) -> float | None:
        """Signed distance of a scored text to the nearest of its source's thresholds (> 0: above)."""
        if row["candidate"] < 0 or row["source"] is None:
            return None
        margins = [row[s] - t for s in SCORES if _finite(row[s]) and (t := self.limit(row["source"], s)) is not None]
        return min(margins, key=abs) if margins else None


def _decimals(values: list) -> int:
    from capfilt.report_charts import decimals

    return decimals([v for v in values if _finite(v)])


# ---------------------------------------------------------------------------------------- example selection


def select(run: _Run, category: str, n: int, seed: int) -> tuple[list[tuple], int]:
    """(the first ``n`` samples of a category, in its order; how many samples it has)."""
    rank = run.rank
    ids = sorted(run.samples)

    def web(rows):
        return next((r for r in rows if r["source"] == "web"), None)

    def value(row, score=rank):
        return row[score] if row is not None and score and _finite(row[score]) else None

    if category == "web-rejected-synthetic-kept":
        chosen = []
        for i in ids:
            rows = run.samples[i]
            w = web(rows)
            if w is None or w["kept"] or w["reason"] not in _FILTER_REJECTIONS:
                continue
            score = _BELOW.get(w["reason"], "itc")  # the filter score that rejected the web text
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


def _images_for(run: _Run, wanted: set) -> dict:
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


def _thumb(data: bytes | None) -> str:
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


# ---------------------------------------------------------------------------------------- cards


def _verdict(run: _Run, r: dict) -> str:
    """Why a text was kept or rejected, with the numbers that decided it."""
    source, reason = r["source"], r["reason"]
    if r["kept"]:
        checks = [
            f"{s.upper()} {r[s]:.{run.digits[s]}f} ≥ {t:.{run.digits[s]}f}"
            for s in SCORES
            if _finite(r[s]) and (t := run.limit(source, s)) is not None
        ]
        text = "kept" + (": " + ", ".join(checks) if checks else "")
        return text + (" · selected (the sample's caption)" if r["selected"] else "")
    if reason in _BELOW:
        s = _BELOW[reason]
        t = run.limit(source, s)
        if _finite(r[s]) and t is not None:
            return f"rejected: {s.upper()} {r[s]:.{run.digits[s]}f} < {t:.{run.digits[s]}f} ({reason})"
    if reason == "itc_below_cascade":
        low = ((run.config.get("filter") or {}).get("cascade") or {}).get("itc_low")
        return f"rejected on ITC alone: {_fmt(r['itc'], run.digits['itc'])} < cascade itc_low {_fmt(low)} ({reason})"
    if reason == "not_in_top_m":
        return f"rejected: not in the top {run.decide.get('top_m') or 1} by {(run.rank or '?').upper()} ({reason})"
    return f"rejected: {REASON_TEXT.get(reason, reason)} ({reason})"


def _card(run: _Run, rows: list[dict], image: str) -> str:
    head = rows[0]
    status = head["sample_status"]
    img = f'<img src="{image}" alt="{_e(head["key"])}">' if image else "no image"
    parts = [f'<div class="card s-{_e(status)}"><div class="thumb">{img}</div><div class="texts">']
    for r in rows:
        cls = ("kept" if r["kept"] else "rejected") + (" sel" if r["selected"] else "")
        text = _e(r["text"]) if r["text"] is not None else "<i>(no text)</i>"
        if r.get("claims") and r.get("claim_supported"):
            text = _claims_html(r)
        scores = " · ".join(f"{s.upper()} {_fmt(r[s], run.digits[s])}" for s in run.scores if _finite(r[s]))
        chain = r.get("clip_scores")  # a rerank chain: every model's score, in chain order
        if chain and any(_finite(c) for c in chain):
            scores += " · CLIP chain " + " → ".join(_fmt(c, run.digits["clip"]) if _finite(c) else "–" for c in chain)
        edited = r.get("edited_text")  # the post-edit stage's rewrite of the selected caption
        edit = f'<div class="edit">edited: {_e(edited)}</div>' if edited else ""
        parts.append(
            f'<div class="t {cls}"><span class="src {_e(r["source"])}">{_e(r["source"])}</span>{text}{edit}'
            f'<div class="meta">{scores + " · " if scores else ""}'
            f'<span class="verdict">{_e(_verdict(run, r))}</span></div></div>'
        )
    parts.append(
        f'</div><div class="foot">{_e(head["shard"])}/{_e(head["key"])}'
        f"{' #' + str(head['occurrence']) if head['occurrence'] else ''} · sample {_e(status)}"
        f"{': no text kept' if status == 'rejected' else ''}</div></div>"
    )
    return "".join(parts)


def _claims_html(r: dict) -> str:
    """A text verified claim by claim: each claim with its score, the unsupported ones struck through."""
    out = []
    for claim, score, ok in zip(r["claims"], r["claim_scores"] or [], r["claim_supported"]):
        tip = f' title="claim score {_fmt(score)}"'
        out.append(f"<span{tip}>{_e(claim)}.</span>" if ok else f'<del class="claim"{tip}>{_e(claim)}.</del>')
    return " ".join(out)


def _fail_line(run: _Run, rows: list[dict]) -> str:
    r = rows[0]
    detail = run.details.get((r["shard"], r["key"], r["reason"])) or REASON_TEXT.get(r["reason"], "")
    name = f"{r['shard']}/{r['key']}" + (f" #{r['occurrence']}" if r["occurrence"] else "")
    title = f"{name} · {r['reason']} · {detail}" + (f" · web text: {r['text']}" if r["text"] else "")
    return (
        f'<div class="fail" title="{_e(title)}"><code>{_e(name)}</code><span class="reason">{_e(r["reason"])}'
        f'</span><span class="detail">{_e(detail)}</span></div>'
    )


# ---------------------------------------------------------------------------------------- sections

# The identity key that names a model, in this order; every other key is listed as its identity.
_IDENTITY_NAME = (("preset", "preset"), ("open_clip", "open_clip"), ("hub_id", "hub"), ("path", "local directory"))
_SETTINGS = {
    "captioner": (
        "num_captions",
        "sample",
        "top_p",
        "top_k",
        "temperature",
        "repetition_penalty",
        "min_new_tokens",
        "max_new_tokens",
        "prompt",
    ),
    "filter": ("max_text_tokens", "cascade"),
    "clip": ("pretrained",),
}


def _models_table(run: _Run) -> str:
    rows = []
    models = []
    for role, identity in (run.meta.get("models") or {}).items():
        if not isinstance(identity, (dict, list)):  # e.g. rethreshold_of: the source run, in the header
            continue
        if isinstance(identity, list):  # a clip chain: one identity per model, in chain order
            models += [(f"{role} {i + 1}/{len(identity)}", role, one) for i, one in enumerate(identity)]
        else:
            models.append((role, role, identity))
    for label, role, identity in models:
        key, kind = next(((k, label) for k, label in _IDENTITY_NAME if identity.get(k)), (None, "?"))
        name = str(identity[key]) if key else "?"
        ident = [
            f'<span class="mono{" hash" if k == "sha256" else ""}">{_e(k)}: {_e(v)}</span>'
            for k, v in identity.items()
            if k != key or k == "path"
        ]  # a path is shortened beside
        shown = _short_path(name, keep=2) if kind == "local directory" else name
        cfg = run.config.get(role) or {}
        cfg = cfg if isinstance(cfg, dict) else {}  # a clip chain is a list of models
        settings = ", ".join(f"{k} {json.dumps(cfg[k])}" for k in _SETTINGS.get(role, ()) if cfg.get(k) is not None)
        rows.append(
            [
                (_e(label), "nowrap"),
                (f'<b title="{_e(name)}">{_e(shown)}</b><br><small>{_e(kind)}</small>', "nowrap"),
                ("<br>".join(ident) or "–", "wrap"),
                (_e(settings) or "–", ""),
            ]
        )
    return _table(["role", "model", "identity (run.json)", "settings"], rows) if rows else "<p>No models recorded.</p>"


def _thresholds_table(run: _Run) -> str:
    rows = [
        [(_e(src), "")] + [(_e(_fmt(run.limit(src, s), run.digits[s])), "num") for s in SCORES]
        for src in ("web", "synthetic")
    ]
    return _table(["source", "ITM ≥", "ITC ≥", "CLIP ≥"], rows)


def _decide_note(run: _Run) -> str:
    d = run.decide
    cascade = (run.config.get("filter") or {}).get("cascade")
    rank_by = d.get("rank_by", "auto") + (f" ({run.rank})" if d.get("rank_by", "auto") == "auto" and run.rank else "")
    items = [
        f"mode {d.get('mode', 'capfilt')}",
        f"top_m {d.get('top_m') or '–'}",
        f"rank by {rank_by}",
        f"select {d.get('select', 'best')}",
    ] + ([f"filter cascade {json.dumps(cascade)}"] if cascade else [])
    return (
        f'<p class="note">Decide: {_e(" · ".join(items))}. A text is kept when each of its scores with a '
        "threshold is at or above it.</p>"
    )


def _config_details(config: dict, title: str) -> str:
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)
    return f"<details><summary>{_e(title)}</summary><pre>{_e(text)}</pre></details>"


def _run_header(run: _Run) -> str:
    m = run.meta
    versions = " · ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    inputs = run.config.get("input") or []
    rows = [
        [("run started", "nowrap"), (_e(f"{m.get('started', '?')} on {m.get('host', '?')}"), "")],
        [("input", "nowrap"), ("<br>".join(f"<code>{_e(i)}</code>" for i in inputs) or "–", "wrap")],
        [("output", "nowrap"), (f"<code>{_e(run.config.get('output', run.dir))}</code>", "wrap")],
        *(
            [[("derived from", "nowrap"), (f"<code>{_e(origin)}</code> (capfilt rethreshold: no model ran)", "wrap")]]
            if (origin := (m.get("models") or {}).get("rethreshold_of"))
            else []
        ),
        [("config fingerprint", "nowrap"), (f"<code>{_e(m.get('fingerprint', '?'))}</code>", "")],
        [("versions", "nowrap"), (_e(versions) or "–", "")],
    ]
    return (
        _table(None, rows, "kv")
        + "<h3>Models</h3>"
        + _models_table(run)
        + '<div class="row"><div><h3>Thresholds (decide)</h3>'
        + _thresholds_table(run)
        + "</div>"
        + (f'<div><h3>Counts</h3><div class="row">{_counts(run)}</div></div>' if run.summary else "")
        + "</div>"
        + _decide_note(run)
        + _config_details(run.config, "resolved config (run.json)")
    )


def _counts(run: _Run) -> str:
    s = run.summary
    parts = []
    if s:
        n = s.get("input") or 0

        def pct(k):
            return f"{s.get(k, 0)} <small>({100 * s.get(k, 0) / n:.0f}%)</small>" if n else str(s.get(k, 0))

        parts.append(
            _table(
                ["samples", "kept", "rejected", "failed"],
                [[(str(n), "num"), (pct("kept"), "num"), (pct("rejected"), "num"), (pct("failed"), "num")]],
            )
        )
        cands = s.get("candidates") or {}
        if cands:
            parts.append(
                _table(
                    ["texts", "kept", "rejected"],
                    [
                        [(_e(src), ""), (str(c.get("kept", 0)), "num"), (str(c.get("rejected", 0)), "num")]
                        for src, c in cands.items()
                    ],
                )
            )
    return "".join(parts)


def _reasons(run: _Run) -> str:
    parts = []
    reasons: dict = {}
    for r in run.ledger:
        if not r["kept"]:
            label = "sample failed" if r["candidate"] == -1 else f"{r['source']} text rejected"
            reasons[(label, r["reason"])] = reasons.get((label, r["reason"]), 0) + 1
    for rows_ in run.samples.values():
        if rows_[0]["sample_status"] == "rejected":
            reasons[("sample rejected", "no_text_kept")] = reasons.get(("sample rejected", "no_text_kept"), 0) + 1
    rows = []
    for (what, reason), n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        example = run.failure_examples.get(reason) if what == "sample failed" else None
        meaning = REASON_TEXT.get(reason, "")
        if reason in _BELOW:
            meaning = f"{_BELOW[reason].upper()} below the {what.split()[0]} threshold"
        rows.append(
            [
                (_e(what), "nowrap"),
                (f"<code>{_e(reason)}</code>", "nowrap"),
                (str(n), "num"),
                (_e(meaning) + (f'<br><small class="mono">e.g. {_e(example)}</small>' if example else ""), "wrap"),
            ]
        )
    parts.append("<h2>Rejections and failures by reason</h2>")
    parts.append(_table(["what", "reason", "count", "meaning"], rows) if rows else "<p>Nothing was rejected.</p>")
    return "".join(parts)


def _histograms(run: _Run) -> str:
    from capfilt.report_charts import score_histogram_svg

    figures = []
    for score in run.scores:
        by_source = {src: {"kept": [], "rejected": []} for src in ("web", "synthetic")}
        for r in run.ledger:
            if r["source"] in by_source and _finite(r[score]):
                by_source[r["source"]]["kept" if r["kept"] else "rejected"].append(r[score])
        svg = score_histogram_svg(score, by_source, {src: run.limit(src, score) for src in by_source})
        if svg:
            figures.append(f'<figure class="hist" data-score="{score}" style="margin:0">{svg}</figure>')
    if not figures:
        return ""
    return (
        '<h2>Scores by source</h2><p class="note">Kept texts in green stacked on rejected ones in red; '
        "the dashed line is the source's threshold. Rejected texts right of it were dropped for another "
        "reason (e.g. not in the top-m synthetic captions).</p>"
        f'<div class="charts">{"".join(figures)}</div>'
    )


def _image_histograms(run: _Run) -> str:
    """Per-image scores (records.IMAGE_SCORES: the LAION heads, the watermark model), one value per
    sample, kept samples on rejected ones, with decide's image rule where set."""
    from capfilt.records import IMAGE_SCORES
    from capfilt.report_charts import image_score_histogram_svg

    figures, cuts = [], []
    for score in IMAGE_SCORES:
        per_sample = {(r["shard"], r["key"], r["occurrence"]): r for r in run.ledger if _finite(r.get(score))}
        kept = [r[score] for r in per_sample.values() if r["sample_status"] == "kept"]
        rejected = [r[score] for r in per_sample.values() if r["sample_status"] != "kept"]
        rule = run.decide.get(score) or {}
        limit = rule.get("min", rule.get("max"))
        svg = image_score_histogram_svg(score, kept, rejected, limit)
        if svg:
            figures.append(f'<figure class="hist" data-score="{score}" style="margin:0">{svg}</figure>')
        if svg and limit is not None:
            cuts.append(_image_cut(run, score, limit, per_sample))
    if not figures:
        return ""
    return (
        '<h2>Image scores</h2><p class="note">One value per image: kept samples in green on rejected '
        "ones in red; the dashed line is decide's rule (aesthetic.min, punsafe.max, pwatermark.max).</p>"
        f'<div class="charts">{"".join(figures)}</div>{"".join(cuts)}'
    )


def _image_cut(run: _Run, score: str, limit: float, per_sample: dict, n: int = 6) -> str:
    """The ``n`` images scored nearest an image rule's limit, on both sides: what the cut decides."""
    texts = {(r["shard"], r["key"], r["occurrence"]): r["text"] for r in run.ledger if r["selected"]}
    nearest = sorted(per_sample.items(), key=lambda kv: (abs(kv[1][score] - limit), kv[0]))[:n]
    rows = []
    for k, r in sorted(nearest, key=lambda kv: kv[1][score]):
        status = "kept" if r["sample_status"] == "kept" else "rejected"
        caption = texts.get(k) or r.get("text") or ""
        rows.append([(_e(r["key"]), "mono"), (f"{r[score]:.4f}", "num"), (status, status), (_e(caption), "wrap")])
    head = f"<h3>Nearest the {score} cut ({limit:g})</h3>"
    return head + _table(["key", score, "sample", "caption (selected, else web text)"], rows)


def _examples(run: _Run, show: list[str], n: int, seed: int, cli_dir: str) -> str:
    picked = {c: select(run, c, n, seed) for c in CATEGORIES}
    nav = []
    for c in CATEGORIES:
        total = picked[c][1]
        if c in show:
            nav.append(f'<a class="on" href="#ex-{c}">{_e(c)} ({total})</a>')
        else:
            nav.append(f'<span class="off">{_e(c)} ({total})</span>')
    others = [c for c in CATEGORIES if c not in show and picked[c][1]]
    hint = (
        f'<p class="note">Other categories: <code>capfilt report {_e(cli_dir)} --show {_e(",".join(others))}'
        f"</code>.</p>"
        if others
        else ""
    )
    wanted = {i for c in show if c != "failed" for i in picked[c][0]}
    images = _images_for(run, wanted)
    thumbs = {i: _thumb(images.get(i)) for i in sorted(wanted)}
    parts = [f'<h2>Examples</h2><nav class="cats">{"".join(nav)}</nav>{hint}']
    for c in show:
        shown, total = picked[c]
        parts.append(
            f'<h3 id="ex-{c}">{_e(c)}: {len(shown)} of {total} sample{"s" if total != 1 else ""}</h3>'
            f'<p class="note">{_e(CATEGORIES[c])}.</p>'
        )
        if not shown:
            parts.append('<p class="note">No sample in this category.</p>')
        elif c == "failed":
            parts.append('<div class="fails">' + "".join(_fail_line(run, run.samples[i]) for i in shown) + "</div>")
        else:  # cards in a grid; failed samples of the draw (random) as one-line entries under it
            cards = [i for i in shown if run.samples[i][0]["candidate"] != -1]
            fails = [i for i in shown if run.samples[i][0]["candidate"] == -1]
            if cards:
                parts.append(
                    '<div class="cards">'
                    + "".join(_card(run, run.samples[i], thumbs.get(i, "")) for i in cards)
                    + "</div>"
                )
            if fails:
                parts.append(
                    '<p class="note">Failed before scoring:</p><div class="fails">'
                    + "".join(_fail_line(run, run.samples[i]) for i in fails)
                    + "</div>"
                )
    return "".join(parts)


def _run_section(run_dir: str | Path, show: list[str] | None, n: int, seed: int, cli_dir: str) -> str:
    run = _Run(run_dir)
    if show is None:  # no --show: the mode's own figure
        show = list(LAION_DEFAULT_SHOW if run.decide.get("mode") == "laion_coco" else DEFAULT_SHOW)
    parts = [_run_header(run)]
    if not run.ledger:
        return "".join(parts) + "<p>No ledger in this run yet.</p>"
    parts.append(_histograms(run))
    parts.append(_image_histograms(run))
    parts.append(_examples(run, show, n, seed, cli_dir))
    parts.append(_reasons(run))
    return "".join(parts)


# ---------------------------------------------------------------------------------------- loops

_ROUND_KNOWN = {
    "round",
    "ablation",
    "trained_on",
    "r1",
    "txt_r1",
    "img_r1",
    "itc_r1",
    "bleu4",
    "cider",
    "capfilt_input",
    "capfilt_kept",
    "calibration",
    "calibration_score",
    "quality",
    "bootstrapped_noise",
    "med",
}


def _delta(value, base, digits: int, scale: float = 1.0) -> str:
    if not _finite(value) or not _finite(base):
        return ""
    d = (value - base) * scale
    if round(d, digits) == 0:
        return '<br><span class="up">±0</span>'
    return f'<br><span class="{"up" if d > 0 else "down"}">{d:+.{digits}f}</span>'


def rounds_table(rounds: list[dict], loop_dir: Path) -> str:
    """The loop's rounds: round first, then what each was trained on, its test metrics with their
    change over round 0, what CapFilt kept, the thresholds it used, and the data's noise."""
    base = next((r for r in rounds if r.get("round") == 0), None) or {}
    has = {k for r in rounds for k, v in r.items() if v not in (None, "", {}, [])}
    cols: list[tuple[str, object]] = [("round", lambda r: (_e(r.get("round")), "num"))]
    if any(r.get("ablation") not in (None, "-") for r in rounds):
        cols.append(("ablation", lambda r: (_e(r.get("ablation")), "nowrap")))
    cols.append(("trained on", lambda r: (_e(r.get("trained_on", "")), "trained")))

    def metric(key, digits, label):
        if key in has:
            cols.append(
                (
                    label,
                    lambda r: (
                        (
                            _fmt(r.get(key), digits)
                            + (_delta(r.get(key), base.get(key), digits) if r is not base else "")
                        ),
                        "num",
                    ),
                )
            )

    metric("r1", 1, "R@1")
    if "txt_r1" in has or "img_r1" in has:
        cols.append(("text / image R@1", lambda r: (f"{_fmt(r.get('txt_r1'), 1)} / {_fmt(r.get('img_r1'), 1)}", "num")))
    metric("itc_r1", 1, "ITC R@1")
    metric("bleu4", 3, "BLEU\u20114")  # a non-breaking hyphen
    metric("cider", 3, "CIDEr")
    if "capfilt_kept" in has:

        def kept(r):
            k, n = r.get("capfilt_kept"), r.get("capfilt_input")
            return ("–" if k is None else f"{k} / {n}" + (f"<br><small>{100 * k / n:.0f}%</small>" if n else ""), "num")

        cols.append(("kept by CapFilt", kept))
    if "calibration" in has:

        def thresholds(r):
            cal = r.get("calibration") or {}
            score = (r.get("calibration_score") or "itm").upper()
            return (
                "<br>".join(f"{_e(score)} {_e(src)} ≥ {_fmt(c.get('threshold'))}" for src, c in cal.items()) or "–",
                "nowrap",
            )

        cols.append(("threshold", thresholds))
    if "bootstrapped_noise" in has:

        def noise(r):
            after = r.get("bootstrapped_noise")
            before = ((r.get("quality") or {}).get("web") or {}).get("noise_before")
            if not _finite(after):
                return "–", "num"
            return (f"{100 * before:.1f}% → " if _finite(before) else "") + f"{100 * after:.1f}%", "num"

        cols.append(("noise: web → kept", noise))
    if "med" in has:

        def med(r):  # shown under its round's folder, the full path on hover
            if not r.get("med"):
                return "–", "nowrap"
            short = _short_path(r["med"], loop_dir / f"round-{r.get('round')}")
            return f'<code title="{_e(r["med"])}">{_e(short)}</code>', "nowrap"

        cols.append(("MED (in round-N/)", med))
    extra = sorted(k for k in has - _ROUND_KNOWN if all(not isinstance(r.get(k), (dict, list)) for r in rounds))
    for k in extra:
        cols.append((k, lambda r, k=k: (_e(f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")), "")))
    return (
        '<div class="scroll">'
        + _table([label for label, _ in cols], [[cell(r) for _, cell in cols] for r in rounds], "rounds")
        + '</div><p class="note">R@1: test recall@1 in % (image-text retrieval ranked by the ITM head; mean of '
        "text and image R@1); small numbers after a metric: change over round 0. threshold: the filter "
        "threshold calibrated on a labelled split; noise: share of wrong texts in the web data and in what "
        "CapFilt kept (ground truth of the synthetic world). MED: the round's pretrained model.</p>"
    )


def _loop_capfilt_dir(loop_dir: Path) -> Path | None:
    """The CapFilt run to show: the last round's, the full captioner + filter ablation first."""

    def order(p: Path):
        try:
            n = int(p.parent.name.split("-", 1)[1])
        except (IndexError, ValueError):
            n = -1
        return n, p.name == "capfilt-captioner_filter", p.stat().st_mtime, p.name

    dirs = [p for p in loop_dir.glob("round-*/capfilt*") if (p / "run.json").is_file()]
    return max(dirs, key=order) if dirs else None


# ---------------------------------------------------------------------------------------- the page


def _report_date(date: bool) -> str:
    if not date:
        return ""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return f'<p class="note">report written {when.isoformat(timespec="seconds")}</p>'


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    n_samples: int = 12,
    seed: int = 0,
    show: list[str] | tuple[str, ...] | None = None,
    date: bool = True,
) -> Path:
    """Write the HTML report of a run (or of a loop: state.json + round-*/) and return its path.
    ``show``: example categories (see CATEGORIES; comma lists allowed), ``n_samples`` cards each."""
    categories = parse_show(show) if show else None  # None: the run's mode chooses (_run_section)
    if n_samples < 0:
        raise ValueError(f"--examples must be >= 0, not {n_samples}")
    from capfilt.io.run_dir import is_run

    if "://" in os.fspath(run_dir):  # a run written to a URL (s3://…): read there, the page written here
        url = os.fspath(run_dir).rstrip("/")
        if not is_run(url):
            raise FileNotFoundError(f"{url} is not a capfilt run (no run.json)")
        title = url.rsplit("/", 1)[-1]
        out = Path(out) if out else Path(f"{title}-report.html")
        where, body = url, _run_section(url, categories, n_samples, seed, url)
        return _write_page(out, title, "CapFilt run (capfilt run)", where, date, [body])
    run_dir = Path(run_dir)
    is_loop = (run_dir / "state.json").is_file()
    if not is_loop and not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is neither a capfilt run (no run.json) nor a loop output (no state.json)")
    out = Path(out) if out else run_dir / "report.html"
    cli_dir = str(run_dir)
    title = run_dir.resolve().name
    what = "bootstrap loop (capfilt loop)" if is_loop else "CapFilt run (capfilt run)"
    parts = []
    if is_loop:
        state = json.loads((run_dir / "state.json").read_text())
        rounds = state.get("rounds", [])
        if (run_dir / "loop.yaml").is_file():
            parts.append(
                f"<details><summary>loop config (loop.yaml)</summary><pre>"
                f"{_e((run_dir / 'loop.yaml').read_text())}</pre></details>"
            )
        if rounds:
            parts.append("<h2>Rounds</h2>" + rounds_table(rounds, run_dir))
        capfilt_dir = _loop_capfilt_dir(run_dir)
        if capfilt_dir is not None:
            rel = capfilt_dir.relative_to(run_dir)
            parts.append(f"<h2>CapFilt run {_e(rel)}</h2>")
            others = sorted(
                str(p.relative_to(run_dir))
                for p in run_dir.glob("round-*/capfilt*")
                if (p / "run.json").is_file() and p != capfilt_dir
            )
            if others:
                parts.append(
                    '<p class="note">Other CapFilt runs of this loop (<code>capfilt report DIR</code> on '
                    "each): " + ", ".join(f"<code>{_e(o)}</code>" for o in others) + "</p>"
                )
            parts.append(_run_section(capfilt_dir, categories, n_samples, seed, str(Path(cli_dir) / rel)))
    else:
        parts.append(_run_section(run_dir, categories, n_samples, seed, cli_dir))
    return _write_page(out, title, what, run_dir.resolve(), date, parts)


def _write_page(out: Path, title: str, what: str, where, date: bool, body: list[str]) -> Path:
    head = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>capfilt report: {_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body><main>'
        f"<h1>capfilt report: {_e(title)}</h1>"
        f'<p class="note">{what}: <code>{_e(where)}</code></p>{_report_date(date)}'
    )
    out.write_text(head + "".join(body) + "</main></body></html>\n", encoding="utf-8")
    return out
