"""The sections of a run's part of the page: header (models, thresholds, counts, config), score and
image histograms, examples, rejections by reason."""

from __future__ import annotations

import json
from pathlib import Path

from capfilt.config import DECODING_SETTINGS, SOURCES, laion_mode
from capfilt.report.cards import examples_section
from capfilt.report.examples import DEFAULT_SHOW, LAION_DEFAULT_SHOW, below
from capfilt.report.markup import esc, finite, fmt, short_path, table
from capfilt.report.run import SCORES, Run

# The identity key that names a model, in this order; every other key is listed as its identity.
_IDENTITY_NAME = (("preset", "preset"), ("open_clip", "open_clip"), ("hub_id", "hub"), ("path", "local directory"))
_SETTINGS = {
    "captioner": DECODING_SETTINGS,  # every decoding setting (a schedule, force_eos_prob: when set)
    "filter": ("max_text_tokens", "cascade"),
    "clip": ("pretrained",),
}


def _models_table(run: Run) -> str:
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
            f'<span class="mono{" hash" if k == "sha256" else ""}">{esc(k)}: {esc(v)}</span>'
            for k, v in identity.items()
            if k != key or k == "path"
        ]  # a path is shortened beside
        shown = short_path(name, keep=2) if kind == "local directory" else name
        cfg = run.config.get(role) or {}
        cfg = cfg if isinstance(cfg, dict) else {}  # a clip chain is a list of models
        settings = ", ".join(f"{k} {json.dumps(cfg[k])}" for k in _SETTINGS.get(role, ()) if cfg.get(k) is not None)
        rows.append(
            [
                (esc(label), "nowrap"),
                (f'<b title="{esc(name)}">{esc(shown)}</b><br><small>{esc(kind)}</small>', "nowrap"),
                ("<br>".join(ident) or "–", "wrap"),
                (esc(settings) or "–", ""),
            ]
        )
    return table(["role", "model", "identity (run.json)", "settings"], rows) if rows else "<p>No models recorded.</p>"


def _thresholds_table(run: Run) -> str:
    rows = [[(esc(src), "")] + [(esc(fmt(run.limit(src, s), run.digits[s])), "num") for s in SCORES] for src in SOURCES]
    return table(["source", "ITM ≥", "ITC ≥", "CLIP ≥"], rows)


def _decide_note(run: Run) -> str:
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
        f'<p class="note">Decide: {esc(" · ".join(items))}. A text is kept when each of its scores with a '
        "threshold is at or above it.</p>"
    )


def _config_details(config: dict, title: str) -> str:
    import yaml

    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)
    return f"<details><summary>{esc(title)}</summary><pre>{esc(text)}</pre></details>"


def _run_header(run: Run) -> str:
    m = run.meta
    versions = " · ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    inputs = run.config.get("input") or []
    rows = [
        [("run started", "nowrap"), (esc(f"{m.get('started', '?')} on {m.get('host', '?')}"), "")],
        [("input", "nowrap"), ("<br>".join(f"<code>{esc(i)}</code>" for i in inputs) or "–", "wrap")],
        [("output", "nowrap"), (f"<code>{esc(run.config.get('output', run.dir))}</code>", "wrap")],
        *(
            [[("derived from", "nowrap"), (f"<code>{esc(origin)}</code> (capfilt rethreshold: no model ran)", "wrap")]]
            if (origin := (m.get("models") or {}).get("rethreshold_of"))
            else []
        ),
        [("config fingerprint", "nowrap"), (f"<code>{esc(m.get('fingerprint', '?'))}</code>", "")],
        [("versions", "nowrap"), (esc(versions) or "–", "")],
    ]
    return (
        table(None, rows, "kv")
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


def _counts(run: Run) -> str:
    s = run.summary
    parts = []
    if s:
        n = s.get("input") or 0

        def pct(k):
            return f"{s.get(k, 0)} <small>({100 * s.get(k, 0) / n:.0f}%)</small>" if n else str(s.get(k, 0))

        parts.append(
            table(
                ["samples", "kept", "rejected", "failed"],
                [[(str(n), "num"), (pct("kept"), "num"), (pct("rejected"), "num"), (pct("failed"), "num")]],
            )
        )
        cands = s.get("candidates") or {}
        if cands:
            parts.append(
                table(
                    ["texts", "kept", "rejected"],
                    [
                        [(esc(src), ""), (str(c.get("kept", 0)), "num"), (str(c.get("rejected", 0)), "num")]
                        for src, c in cands.items()
                    ],
                )
            )
    return "".join(parts)


def _reasons(run: Run) -> str:
    from capfilt.records import REASON_TEXT  # records loads pyarrow: not for `capfilt --help`

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
        if reason in below():
            meaning = f"{below()[reason].upper()} below the {what.split()[0]} threshold"
        rows.append(
            [
                (esc(what), "nowrap"),
                (f"<code>{esc(reason)}</code>", "nowrap"),
                (str(n), "num"),
                (esc(meaning) + (f'<br><small class="mono">e.g. {esc(example)}</small>' if example else ""), "wrap"),
            ]
        )
    parts.append("<h2>Rejections and failures by reason</h2>")
    parts.append(table(["what", "reason", "count", "meaning"], rows) if rows else "<p>Nothing was rejected.</p>")
    return "".join(parts)


def _histograms(run: Run) -> str:
    from capfilt.report.charts import score_histogram_svg

    figures = []
    for score in run.scores:
        by_source = {src: {"kept": [], "rejected": []} for src in SOURCES}
        for r in run.ledger:
            if r["source"] in by_source and finite(r[score]):
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


def _image_histograms(run: Run) -> str:
    """Per-image scores (records.IMAGE_SCORES: the LAION heads, the watermark model), one value per
    sample, kept samples on rejected ones, with decide's image rule where set."""
    from capfilt.records import IMAGE_SCORES
    from capfilt.report.charts import image_score_histogram_svg

    figures, cuts = [], []
    for score in IMAGE_SCORES:
        per_sample = {(r["shard"], r["key"], r["occurrence"]): r for r in run.ledger if finite(r.get(score))}
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


def _image_cut(run: Run, score: str, limit: float, per_sample: dict, n: int = 6) -> str:
    """The ``n`` images scored nearest an image rule's limit, on both sides: what the cut decides."""
    texts = {(r["shard"], r["key"], r["occurrence"]): r["text"] for r in run.ledger if r["selected"]}
    nearest = sorted(per_sample.items(), key=lambda kv: (abs(kv[1][score] - limit), kv[0]))[:n]
    rows = []
    for k, r in sorted(nearest, key=lambda kv: kv[1][score]):
        status = "kept" if r["sample_status"] == "kept" else "rejected"
        caption = texts.get(k) or r.get("text") or ""
        rows.append([(esc(r["key"]), "mono"), (f"{r[score]:.4f}", "num"), (status, status), (esc(caption), "wrap")])
    head = f"<h3>Nearest the {score} cut ({limit:g})</h3>"
    return head + table(["key", score, "sample", "caption (selected, else web text)"], rows)


def run_section(run_dir: str | Path, show: list[str] | None, n: int, seed: int, cli_dir: str) -> str:
    run = Run(run_dir)
    if show is None:  # no --show: the mode's own figure
        show = list(LAION_DEFAULT_SHOW if laion_mode(run.decide) else DEFAULT_SHOW)
    parts = [_run_header(run)]
    if not run.ledger:
        return "".join(parts) + "<p>No ledger in this run yet.</p>"
    parts.append(_histograms(run))
    parts.append(_image_histograms(run))
    parts.append(examples_section(run, show, n, seed, cli_dir))
    parts.append(_reasons(run))
    return "".join(parts)
