"""The examples section: one card per sample (its image beside every text, kept or rejected and
why), one line per failed sample."""

from __future__ import annotations

from capfilt.report.examples import BELOW, CATEGORIES, images_for, select, thumb
from capfilt.report.markup import esc, finite, fmt
from capfilt.report.run import SCORES, Run


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
    if reason in BELOW:
        s = BELOW[reason]
        t = run.limit(source, s)
        if finite(r[s]) and t is not None:
            return f"rejected: {s.upper()} {r[s]:.{run.digits[s]}f} < {t:.{run.digits[s]}f} ({reason})"
    if reason == "itc_below_cascade":
        low = ((run.config.get("filter") or {}).get("cascade") or {}).get("itc_low")
        return f"rejected on ITC alone: {fmt(r['itc'], run.digits['itc'])} < cascade itc_low {fmt(low)} ({reason})"
    if reason == "not_in_top_m":
        return f"rejected: not in the top {run.decide.get('top_m') or 1} by {(run.rank or '?').upper()} ({reason})"
    return f"rejected: {REASON_TEXT.get(reason, reason)} ({reason})"


def _card(run: Run, rows: list[dict], image: str) -> str:
    head = rows[0]
    status = head["sample_status"]
    img = f'<img src="{image}" alt="{esc(head["key"])}">' if image else "no image"
    parts = [f'<div class="card s-{esc(status)}"><div class="thumb">{img}</div><div class="texts">']
    for r in rows:
        cls = ("kept" if r["kept"] else "rejected") + (" sel" if r["selected"] else "")
        text = esc(r["text"]) if r["text"] is not None else "<i>(no text)</i>"
        if r.get("claims") and r.get("claim_supported"):
            text = _claims_html(r)
        scores = " · ".join(f"{s.upper()} {fmt(r[s], run.digits[s])}" for s in run.scores if finite(r[s]))
        chain = r.get("clip_scores")  # a rerank chain: every model's score, in chain order
        if chain and any(finite(c) for c in chain):
            scores += " · CLIP chain " + " → ".join(fmt(c, run.digits["clip"]) if finite(c) else "–" for c in chain)
        edited = r.get("edited_text")  # the post-edit stage's rewrite of the selected caption
        edit = f'<div class="edit">edited: {esc(edited)}</div>' if edited else ""
        parts.append(
            f'<div class="t {cls}"><span class="src {esc(r["source"])}">{esc(r["source"])}</span>{text}{edit}'
            f'<div class="meta">{scores + " · " if scores else ""}'
            f'<span class="verdict">{esc(_verdict(run, r))}</span></div></div>'
        )
    parts.append(
        f'</div><div class="foot">{esc(head["shard"])}/{esc(head["key"])}'
        f"{' #' + str(head['occurrence']) if head['occurrence'] else ''} · sample {esc(status)}"
        f"{': no text kept' if status == 'rejected' else ''}</div></div>"
    )
    return "".join(parts)


def _claims_html(r: dict) -> str:
    """A text verified claim by claim: each claim with its score, the unsupported ones struck through."""
    out = []
    for claim, score, ok in zip(r["claims"], r["claim_scores"] or [], r["claim_supported"]):
        tip = f' title="claim score {fmt(score)}"'
        out.append(f"<span{tip}>{esc(claim)}.</span>" if ok else f'<del class="claim"{tip}>{esc(claim)}.</del>')
    return " ".join(out)


def _fail_line(run: Run, rows: list[dict]) -> str:
    from capfilt.records import REASON_TEXT  # records loads pyarrow: not for `capfilt --help`

    r = rows[0]
    detail = run.details.get((r["shard"], r["key"], r["reason"])) or REASON_TEXT.get(r["reason"], "")
    name = f"{r['shard']}/{r['key']}" + (f" #{r['occurrence']}" if r["occurrence"] else "")
    title = f"{name} · {r['reason']} · {detail}" + (f" · web text: {r['text']}" if r["text"] else "")
    return (
        f'<div class="fail" title="{esc(title)}"><code>{esc(name)}</code><span class="reason">{esc(r["reason"])}'
        f'</span><span class="detail">{esc(detail)}</span></div>'
    )


def examples_section(run: Run, show: list[str], n: int, seed: int, cli_dir: str) -> str:
    picked = {c: select(run, c, n, seed) for c in CATEGORIES}
    nav = []
    for c in CATEGORIES:
        total = picked[c][1]
        if c in show:
            nav.append(f'<a class="on" href="#ex-{c}">{esc(c)} ({total})</a>')
        else:
            nav.append(f'<span class="off">{esc(c)} ({total})</span>')
    others = [c for c in CATEGORIES if c not in show and picked[c][1]]
    hint = (
        f'<p class="note">Other categories: <code>capfilt report {esc(cli_dir)} --show {esc(",".join(others))}'
        f"</code>.</p>"
        if others
        else ""
    )
    wanted = {i for c in show if c != "failed" for i in picked[c][0]}
    images = images_for(run, wanted)
    thumbs = {i: thumb(images.get(i)) for i in sorted(wanted)}
    parts = [f'<h2>Examples</h2><nav class="cats">{"".join(nav)}</nav>{hint}']
    for c in show:
        shown, total = picked[c]
        parts.append(
            f'<h3 id="ex-{c}">{esc(c)}: {len(shown)} of {total} sample{"s" if total != 1 else ""}</h3>'
            f'<p class="note">{esc(CATEGORIES[c])}.</p>'
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
