"""`capfilt report RUN_DIR`: one self-contained HTML page about a run (or a bootstrap loop).

Like the BLIP paper's figure: sample images with their web text and synthetic captions, kept texts
in green and rejected ones in red with their scores and reasons; score histograms by source;
rejections by reason; per-round metrics when the directory is a `capfilt loop` output. Images are
embedded as base64 thumbnails and charts as inline SVG, so the file can be mailed around.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.io.images import DecodeLimits, ImageDecodeError, decode_image
from capfilt.io.shards import expand_shards, image_member, read_shard, shard_id

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px}
.card img{width:128px;height:128px;object-fit:contain;background:#eee;float:left;margin:0 10px 6px 0}
.t{font-size:12.5px;margin:3px 0;padding:3px 6px;border-radius:4px;clear:none}
.kept{background:#dff5e1;border-left:4px solid #2e9d44}.rejected{background:#fde2e2;border-left:4px solid #d33}
.sel{font-weight:600}.src{color:#666;font-size:11px}.key{font-size:11px;color:#888;clear:both}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}
th{background:#eee}.charts{display:flex;flex-wrap:wrap;gap:20px}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""
COLOURS = {"web": "#3b6fd4", "synthetic": "#e08a1e"}


def _thumb(data: bytes | None) -> str:
    if not data:
        return ""
    try:
        img = decode_image(data, DecodeLimits(max_side=128, min_side=1))
    except ImageDecodeError:
        return ""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def histogram_svg(title: str, values: dict[str, list[float]], bins: int = 20, width: int = 360,
                  height: int = 170, thresholds: dict[str, float | None] | None = None) -> str:
    """Overlaid histograms (one per source) as inline SVG, each source scaled to its own tallest
    bin (synthetic captions outnumber web texts K to 1), with each source's threshold as a dashed
    line: where the filter cut."""
    every = [v for vs in values.values() for v in vs if v is not None and math.isfinite(v)]
    if not every:
        return ""
    marks = {s: t for s, t in (thresholds or {}).items() if t is not None and math.isfinite(t)}
    lo, hi = min(every + list(marks.values())), max(every + list(marks.values()))
    hi = hi if hi > lo else lo + 1e-6
    plot_h, plot_w = height - 40, width - 20
    bar_w = plot_w / bins

    def x_of(v: float) -> float:
        return 10 + (v - lo) / (hi - lo) * plot_w

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="10" y="14" font-size="13">{html.escape(title)}</text>']
    for source, vs in values.items():
        c = [0] * bins
        for v in vs:
            if v is not None and math.isfinite(v):
                c[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
        top = max(c) or 1
        for i, n in enumerate(c):
            h = n / top * plot_h
            parts.append(f'<rect x="{10 + i * bar_w:.1f}" y="{20 + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
                         f'height="{h:.1f}" fill="{COLOURS.get(source, "#888")}" fill-opacity="0.55"/>')
    for k, (source, t) in enumerate(sorted(marks.items(), reverse=True)):  # labels: web first, top right
        x, colour = x_of(t), COLOURS.get(source, "#888")
        parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{20 + plot_h}" stroke="{colour}" '
                     f'stroke-width="2" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{width - 10 - 120 * k}" y="14" font-size="11" fill="{colour}" '
                     f'text-anchor="end">{html.escape(source)} \u2265 {t:.3f}</text>')
    parts.append(f'<text x="10" y="{height - 5}" font-size="11">{lo:.3f}</text>')
    parts.append(f'<text x="{width - 50}" y="{height - 5}" font-size="11">{hi:.3f}</text></svg>')
    return "".join(parts)


def _samples(ledger: list[dict]) -> dict:
    out: dict = {}
    for r in ledger:
        out.setdefault((r["shard"], r["key"], r["occurrence"]), []).append(r)
    return out


def _images_for(config: dict, wanted: set) -> dict:
    """Image bytes of the wanted (shard, key, occurrence) from the run's input shards."""
    found = {}
    shards = {s for s, _, _ in wanted}
    for url in expand_shards(config["input"]):
        if shard_id(url) not in shards:
            continue
        try:
            for s in read_shard(url):
                if (s.shard, s.key, s.occurrence) in wanted:
                    member = image_member(s)
                    found[(s.shard, s.key, s.occurrence)] = member[1] if member else None
        except Exception:  # noqa: BLE001 - a report shows what it can; missing images show blank
            continue
    return found


def _card(rows: list[dict], image: str) -> str:
    rows = sorted(rows, key=lambda r: r["candidate"])
    head = rows[0]
    parts = ['<div class="card">']
    if image:
        parts.append(f'<img src="{image}" alt="{html.escape(head["key"])}">')
    if head["candidate"] == -1:
        parts.append(f'<div class="t rejected">failed: {html.escape(head["reason"])}</div>')
    for r in rows:
        if r["candidate"] == -1:
            continue
        cls = "kept" if r["kept"] else "rejected"
        sel = " sel" if r["selected"] else ""
        why = "" if r["kept"] else f' — {html.escape(r["reason"])}'
        text = html.escape(r["text"] if r["text"] is not None else "(no text)")
        parts.append(f'<div class="t {cls}{sel}"><span class="src">{r["source"]}</span> {text}'
                     f'<br><span class="src">itm {_fmt(r["itm"])} · itc {_fmt(r["itc"])} · clip {_fmt(r["clip"])}'
                     f'{why}</span></div>')
    parts.append(f'<div class="key">{html.escape(head["shard"])}/{html.escape(head["key"])} · '
                 f'{head["sample_status"]}</div></div>')
    return "".join(parts)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _run_section(run_dir: Path, n_samples: int, seed: int) -> str:
    files = sorted((run_dir / "ledger").glob("*.parquet"))
    if not files:
        return "<p>No ledger in this run yet.</p>"
    ledger = pq.read_table(files).to_pylist()
    samples = _samples(ledger)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    keys = sorted(samples)
    random.Random(seed).shuffle(keys)
    shown = sorted(keys[:n_samples])
    config = json.loads((run_dir / "run.json").read_text())["config"]
    images = _images_for(config, set(shown))
    parts = []
    if summary:
        parts.append(_table([{k: summary.get(k) for k in ("input", "kept", "rejected", "failed")}],
                            ["input", "kept", "rejected", "failed"]))
    reasons: dict = {}
    for r in ledger:
        if not r["kept"]:
            label = "sample failed" if r["candidate"] == -1 else f"{r['source']} text rejected"
            reasons[(label, r["reason"])] = reasons.get((label, r["reason"]), 0) + 1
    parts.append("<h2>Rejections by reason</h2>")
    parts.append(_table([{"what": w, "reason": rsn, "count": n} for (w, rsn), n in
                         sorted(reasons.items(), key=lambda kv: -kv[1])], ["what", "reason", "count"]))
    parts.append('<h2>Scores by source</h2><div class="legend"><span style="background:#3b6fd4"></span>web'
                 '<span style="background:#e08a1e"></span>synthetic &nbsp; (each source scaled to its tallest bin; '
                 'dashed: its threshold)</div><div class="charts">')
    decide = config.get("decide") or {}
    for score in ("itm", "itc", "clip"):
        values = {s: [r[score] for r in ledger if r["source"] == s and r[score] is not None]
                  for s in ("web", "synthetic")}
        thresholds = {s: (decide.get(s) or {}).get(score) for s in values if values[s]}
        parts.append(histogram_svg(f"{score.upper()} score", values, thresholds=thresholds))
    parts.append("</div>")
    parts.append(f"<h2>Samples ({len(shown)} of {len(samples)}, random)</h2><div class='grid'>")
    parts += [_card(samples[k], _thumb(images.get(k))) for k in shown]
    parts.append("</div>")
    return "".join(parts)


def build_report(run_dir: str | Path, out: str | Path | None = None, n_samples: int = 24, seed: int = 0) -> Path:
    """Write the HTML report; a loop directory (state.json + round-*/) gets per-round metrics too."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>capfilt report</title><style>{CSS}"
             f"</style></head><body><h1>capfilt report — {html.escape(str(run_dir))}</h1>"]
    state_file = run_dir / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        rounds = state.get("rounds", [])
        if rounds:
            columns = sorted({k for r in rounds for k in r if not isinstance(r[k], (dict, list))})
            parts.append("<h2>Rounds</h2>" + _table(rounds, columns))
        capfilt_dirs = sorted(run_dir.glob("round-*/capfilt*"), key=lambda p: p.stat().st_mtime)
        if capfilt_dirs:
            parts.append(f"<h2>CapFilt of {html.escape(capfilt_dirs[-1].parent.name)}</h2>")
            parts.append(_run_section(capfilt_dirs[-1], n_samples, seed))
    else:
        parts.append(_run_section(run_dir, n_samples, seed))
    parts.append("</body></html>")
    out.write_text("".join(parts))
    return out
