"""The examples section: what each sample's card shows (its image beside every text, kept or
rejected and why) and each failed sample's line; templates/examples.html lays them out."""

from __future__ import annotations

from capfilt.report.examples import CATEGORIES, below, images_for, select, thumb
from capfilt.report.markup import finite, fmt
from capfilt.report.run import SCORES, Run
from capfilt.report.templates import render


def _verdict(run: Run, r: dict) -> str:
    """Why a text was kept or rejected, with the numbers that decided it."""
    from capfilt.records import REASON_TEXT  # records loads pyarrow: not for `capfilt --help`

    source, reason = r["source"], r["reason"]
    if r["kept"]:
        checks = [
            f"{s.upper()} {r[s]:.{run.digits[s]}f} ≥ {t:.{run.digits[s]}f}"
            for s in SCORES
            if finite(r[s]) and (t := run.limit(source, s)) is not None
        ]
        text = "kept" + (": " + ", ".join(checks) if checks else "")
        return text + (" · selected (the sample's caption)" if r["selected"] else "")
    if reason in below():
        s = below()[reason]
        t = run.limit(source, s)
        if finite(r[s]) and t is not None:
            return f"rejected: {s.upper()} {r[s]:.{run.digits[s]}f} < {t:.{run.digits[s]}f} ({reason})"
    if reason == "itc_below_cascade":
        low = ((run.config.get("filter") or {}).get("cascade") or {}).get("itc_low")
        return f"rejected on ITC alone: {fmt(r['itc'], run.digits['itc'])} < cascade itc_low {fmt(low)} ({reason})"
    if reason == "not_in_top_m":
        return f"rejected: not in the top {run.decide.get('top_m') or 1} by {(run.rank or '?').upper()} ({reason})"
    return f"rejected: {REASON_TEXT.get(reason, reason)} ({reason})"


def _card(run: Run, rows: list[dict], image: str) -> dict:
    """What one sample's card shows (templates/examples.html lays it out)."""
    head = rows[0]
    texts = []
    for r in rows:
        scores = " · ".join(f"{s.upper()} {fmt(r[s], run.digits[s])}" for s in run.scores if finite(r[s]))
        chain = r.get("clip_scores")  # a rerank chain: every model's score, in chain order
        if chain and any(finite(c) for c in chain):
            scores += " · CLIP chain " + " → ".join(fmt(c, run.digits["clip"]) if finite(c) else "–" for c in chain)
        verified = r.get("claims") and r.get("claim_supported")  # a text verified claim by claim
        texts.append(
            {
                "cls": ("kept" if r["kept"] else "rejected") + (" sel" if r["selected"] else ""),
                "source": r["source"],
                "text": r["text"],
                "claims": _claims(r) if verified else [],
                "edited": r.get("edited_text"),  # the post-edit stage's rewrite of the selected caption
                "scores": scores,
                "verdict": _verdict(run, r),
            }
        )
    return {
        "status": head["sample_status"],
        "image": image,
        "key": head["key"],
        "shard": head["shard"],
        "occurrence": head["occurrence"],
        "texts": texts,
    }


def _claims(r: dict) -> list[dict]:
    """Each claim with its score; the unsupported ones are struck through."""
    return [
        {"text": claim, "score": fmt(score), "supported": ok}
        for claim, score, ok in zip(r["claims"], r["claim_scores"] or [], r["claim_supported"])
    ]


def _fail_line(run: Run, rows: list[dict]) -> dict:
    from capfilt.records import REASON_TEXT  # records loads pyarrow: not for `capfilt --help`

    r = rows[0]
    detail = run.details.get((r["shard"], r["key"], r["reason"])) or REASON_TEXT.get(r["reason"], "")
    name = f"{r['shard']}/{r['key']}" + (f" #{r['occurrence']}" if r["occurrence"] else "")
    title = f"{name} · {r['reason']} · {detail}" + (f" · web text: {r['text']}" if r["text"] else "")
    return {"title": title, "name": name, "reason": r["reason"], "detail": detail}


def examples_section(run: Run, show: list[str], n: int, seed: int, cli_dir: str) -> str:
    picked = {c: select(run, c, n, seed) for c in CATEGORIES}
    wanted = {i for c in show if c != "failed" for i in picked[c][0]}
    images = images_for(run, wanted)
    thumbs = {i: thumb(images.get(i)) for i in sorted(wanted)}
    sections = []
    for c in show:
        shown, total = picked[c]
        # failed samples get one line; in another category's draw (random) under its cards
        failed = [i for i in shown if c == "failed" or run.samples[i][0]["candidate"] == -1]
        sections.append(
            {
                "name": c,
                "about": CATEGORIES[c],
                "shown": len(shown),
                "total": total,
                "cards": [_card(run, run.samples[i], thumbs.get(i, "")) for i in shown if i not in failed],
                "fails": [_fail_line(run, run.samples[i]) for i in failed],
            }
        )
    return render(
        "examples.html",
        nav=[{"name": c, "total": picked[c][1], "shown": c in show} for c in CATEGORIES],
        others=[c for c in CATEGORIES if c not in show and picked[c][1]],
        cli_dir=cli_dir,
        sections=sections,
    )
