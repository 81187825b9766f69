"""The loop part of the page: the rounds table and the CapFilt run a loop report shows."""

from __future__ import annotations

from pathlib import Path

from capfilt.report.markup import esc, finite, fmt, short_path, table

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
    if not finite(value) or not finite(base):
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
    cols: list[tuple[str, object]] = [("round", lambda r: (esc(r.get("round")), "num"))]
    if any(r.get("ablation") not in (None, "-") for r in rounds):
        cols.append(("ablation", lambda r: (esc(r.get("ablation")), "nowrap")))
    cols.append(("trained on", lambda r: (esc(r.get("trained_on", "")), "trained")))

    def metric(key, digits, label):
        if key in has:
            cols.append(
                (
                    label,
                    lambda r: (
                        (
                            fmt(r.get(key), digits)
                            + (_delta(r.get(key), base.get(key), digits) if r is not base else "")
                        ),
                        "num",
                    ),
                )
            )

    metric("r1", 1, "R@1")
    if "txt_r1" in has or "img_r1" in has:
        cols.append(("text / image R@1", lambda r: (f"{fmt(r.get('txt_r1'), 1)} / {fmt(r.get('img_r1'), 1)}", "num")))
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
                "<br>".join(f"{esc(score)} {esc(src)} ≥ {fmt(c.get('threshold'))}" for src, c in cal.items()) or "–",
                "nowrap",
            )

        cols.append(("threshold", thresholds))
    if "bootstrapped_noise" in has:

        def noise(r):
            after = r.get("bootstrapped_noise")
            before = ((r.get("quality") or {}).get("web") or {}).get("noise_before")
            if not finite(after):
                return "–", "num"
            return (f"{100 * before:.1f}% → " if finite(before) else "") + f"{100 * after:.1f}%", "num"

        cols.append(("noise: web → kept", noise))
    if "med" in has:

        def med(r):  # shown under its round's folder, the full path on hover
            if not r.get("med"):
                return "–", "nowrap"
            short = short_path(r["med"], loop_dir / f"round-{r.get('round')}")
            return f'<code title="{esc(r["med"])}">{esc(short)}</code>', "nowrap"

        cols.append(("MED (in round-N/)", med))
    extra = sorted(k for k in has - _ROUND_KNOWN if all(not isinstance(r.get(k), (dict, list)) for r in rounds))
    for k in extra:
        cols.append((k, lambda r, k=k: (esc(f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")), "")))
    return (
        '<div class="scroll">'
        + table([label for label, _ in cols], [[cell(r) for _, cell in cols] for r in rounds], "rounds")
        + '</div><p class="note">R@1: test recall@1 in % (image-text retrieval ranked by the ITM head; mean of '
        "text and image R@1); small numbers after a metric: change over round 0. threshold: the filter "
        "threshold calibrated on a labelled split; noise: share of wrong texts in the web data and in what "
        "CapFilt kept (ground truth of the synthetic world). MED: the round's pretrained model.</p>"
    )


def loop_capfilt_dir(loop_dir: Path) -> Path | None:
    """The CapFilt run to show: the last round's, the full captioner + filter ablation first."""

    def order(p: Path):
        try:
            n = int(p.parent.name.split("-", 1)[1])
        except (IndexError, ValueError):
            n = -1
        return n, p.name == "capfilt-captioner_filter", p.stat().st_mtime, p.name

    from capfilt.io.names import RUN_FILE

    dirs = [p for p in loop_dir.glob("round-*/capfilt*") if (p / RUN_FILE).is_file()]
    return max(dirs, key=order) if dirs else None
