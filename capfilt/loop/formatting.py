"""The tables `capfilt loop` prints: the rounds and, per round, the quality of the data."""

from __future__ import annotations


def _pct(v) -> str:
    return "    –" if v is None else f"{100 * v:5.1f}%"


def _num(v, spec: str) -> str:
    """A metric, or a dash where the round has none (no captioner: no BLEU/CIDEr), never a 0 that
    reads as a measured score."""
    width = int(spec.split(".")[0])
    return f"{'–':>{width}}" if v is None else format(v, spec)


def format_rounds(state: dict) -> str:
    lines = [
        f"{'round':>5}  {'trained on':38s} {'R@1':>6} {'ITC R@1':>8} {'BLEU-4':>7} {'CIDEr':>6}  "
        f"{'kept':>6} {'noise':>6}"
    ]
    for r in state["rounds"]:
        lines.append(
            f"{r['round']:>5}  {r['trained_on']:38s} {r['r1']:6.1f} {r['itc_r1']:8.1f} "
            f"{_num(r.get('bleu4'), '7.3f')} {_num(r.get('cider'), '6.3f')}  {r.get('capfilt_kept', ''):>6} "
            f"{_pct(r.get('bootstrapped_noise')) if 'bootstrapped_noise' in r else '':>6}"
        )
    return "\n".join(lines)


def format_quality(record: dict) -> str:
    """What CapFilt did to the web data: against the ground truth where the samples carry it (the
    synthetic world), else only what exists: its counts and calibrated thresholds."""
    q = record.get("quality")
    calib = record.get("calibration", {})
    score = record.get("calibration_score", "itm").upper()
    lines = [
        f"  {score} threshold {src}: {c['threshold']:.3f} (calibration precision {_pct(c['precision'])}, "
        f"recall {_pct(c['recall'])})"
        for src, c in calib.items()
    ]
    if not q or not (q["web"]["texts"] or q["synthetic"]["texts"]):
        if record.get("capfilt_input") is None:
            return ""
        return "\n".join(
            [
                f"CapFilt on the web data (round {record['round']}, {record['ablation']}):",
                *lines,
                f"  kept {record['capfilt_kept']} of {record['capfilt_input']} samples "
                "(no ground truth in these samples: no noise figures)",
            ]
        )
    w, s = q["web"], q["synthetic"]
    synthetic_correct = 1 - s["noise_before"] if s["noise_before"] is not None else None
    return "\n".join(
        [
            f"CapFilt on the web data (round {record['round']}, {record['ablation']}), against ground truth:",
            *lines,
            f"  web texts        {w['texts']:6d}   noise before {_pct(w['noise_before'])}"
            f"   after {_pct(w['noise_after'])}",
            f"  filter on web    mismatched removed {_pct(w['wrong_removed'])}   matched kept {_pct(w['correct_kept'])}"
            f"   precision {_pct(w['precision'])}   recall {_pct(w['recall'])}",
            f"  synthetic        {s['texts']:6d}   correct {_pct(synthetic_correct)}"
            f"   kept {s['kept']}   correct among kept {_pct(s['precision'])}",
            f"  bootstrapped set {q['bootstrapped_texts']:6d} texts   noise {_pct(q['bootstrapped_noise'])}",
        ]
    )
