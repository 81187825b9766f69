"""Choose filter thresholds per source: from a target keep rate, or from labelled examples.

From labels, the threshold is the one with the best F-beta (beta < 1 favours precision: a clean
dataset matters more than a large one), or the lowest one reaching a target precision. Labels can
also choose the score itself (`best_score`): a briefly fine-tuned filter's ITC head can separate
matched from mismatched texts better than its ITM head, and the labelled set shows which.

A clip chain's scores calibrate too: ``clip`` (the chain's last model, what ``decide.{source}.clip``
thresholds) over the texts the chain passed on, and ``clip.K`` (model K's, from the ledger's
``clip_scores``; what that model's ``min_score`` cuts) over every text model K scored.
"""

from __future__ import annotations

import math
import re

from capfilt.config.sections import FILTER_SCORES, IMAGE_RULE_SIDES, SCORES, SOURCES
from capfilt.records import CLIP_CHAIN_CUTS

_CHAIN_SCORE = re.compile(r"^clip\.(\d+)$")


def score_value(row: dict, score: str):
    """A ledger row's ``itm``, ``itc`` or ``clip``, or ``clip.K``: clip chain model K's cosine
    (`clip_scores`; a one-model chain's ledger has none: its model 0's score is ``clip``). None
    where the row has no such score, and for ``clip`` where the chain cut the text before any
    ``decide`` threshold could apply to it."""
    chain = _CHAIN_SCORE.match(score)
    if chain is None:
        if score == "clip" and row.get("reason") in CLIP_CHAIN_CUTS:
            return None
        return row.get(score)
    k, scores = int(chain.group(1)), row.get("clip_scores")
    if scores is None:
        return row.get("clip") if k == 0 else None
    return scores[k] if k < len(scores) else None


def parse_keep_rates(items: list[str]) -> dict[str, float]:
    """``["web=0.7", "synthetic=0.5"]`` -> ``{"web": 0.7, "synthetic": 0.5}``, naming what is wrong."""
    out = {}
    for item in items:
        source, sep, raw = item.partition("=")
        source = source.strip()
        if not sep:
            raise ValueError(f"--keep-rate expects SOURCE=RATE (e.g. web=0.7), got {item!r}")
        if source not in SOURCES:
            raise ValueError(f"--keep-rate {item}: unknown source {source!r}; the sources are {', '.join(SOURCES)}")
        try:
            rate = float(raw)
        except ValueError:
            raise ValueError(f"--keep-rate {item}: the rate must be a number in (0, 1]") from None
        if not 0 < rate <= 1:
            raise ValueError(f"--keep-rate {item}: the rate must be in (0, 1]")
        out[source] = rate
    return out


def threshold_for_keep_rate(scores: list[float], keep_rate: float) -> float:
    """The score above which `keep_rate` of the texts lie."""
    if not scores:
        raise ValueError("no scores to calibrate on")
    if not 0 < keep_rate <= 1:
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate}")
    ordered = sorted(scores, reverse=True)
    n_keep = max(1, math.ceil(keep_rate * len(ordered)))
    return ordered[n_keep - 1]


def precision_recall(scores: list[float], labels: list[bool], threshold: float) -> tuple[float, float]:
    kept = [lab for s, lab in zip(scores, labels) if s >= threshold]
    positives = sum(labels)
    precision = sum(kept) / len(kept) if kept else 1.0
    recall = sum(kept) / positives if positives else 1.0
    return precision, recall


def threshold_from_labels(
    scores: list[float], labels: list[bool], *, beta: float = 0.5, min_precision: float | None = None
) -> dict:
    """Best threshold over the observed scores; returns threshold, precision, recall."""
    if not scores or len(scores) != len(labels):
        raise ValueError("need one label per score, and at least one")
    if not any(labels):  # nothing here deserves keeping: a threshold above every score
        return {"threshold": float(max(scores)) + 1e-6, "precision": 1.0, "recall": 0.0, "f": 0.0}
    best = None
    for t in sorted(set(scores)):
        p, r = precision_recall(scores, labels, t)
        if min_precision is not None:
            if p >= min_precision and (best is None or r > best["recall"]):
                best = {"threshold": t, "precision": p, "recall": r}
            continue
        f = (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0
        if best is None or f > best["f"]:
            best = {"threshold": t, "precision": p, "recall": r, "f": f}
    if best is None:
        raise ValueError(f"no threshold reaches precision {min_precision}")
    return best


def calibrate_run(
    rows: list[dict],
    *,
    keep_rate: dict | None = None,
    beta: float = 0.5,
    min_precision: float | None = None,
    score: str = "itm",
) -> dict:
    """Thresholds per source from ledger rows: a source named in ``keep_rate`` by its keep rate
    (with precision and recall when its rows carry `correct` labels), any other from its labels.
    A source with neither (no keep rate, no labels: any real run) is left out of the result."""
    keep_rate = keep_rate or {}
    unknown = sorted(set(keep_rate) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown source(s) {', '.join(unknown)}; the sources are {', '.join(SOURCES)}")
    out = {}
    for source in SOURCES:
        rs = [r for r in rows if r["source"] == source and score_value(r, score) is not None]
        if not rs:
            continue
        scores = [score_value(r, score) for r in rs]
        labelled = all(r.get("correct") is not None for r in rs)
        if source in keep_rate:
            t = threshold_for_keep_rate(scores, keep_rate[source])
            result = {"threshold": t, "keep_rate": sum(s >= t for s in scores) / len(scores)}
            if labelled:
                result["precision"], result["recall"] = precision_recall(scores, [r["correct"] for r in rs], t)
        elif labelled:
            result = threshold_from_labels(scores, [r["correct"] for r in rs], beta=beta, min_precision=min_precision)
        else:
            continue
        out[source] = result
    return out


def calibrate_image(rows: list[dict], score: str, keep_rate: float) -> dict:
    """The limit of decide's image rule on ``score`` (aesthetic, punsafe, pwatermark) that keeps
    ``keep_rate`` of the run's scored images: one value per sample (its ledger rows all carry it),
    a min for aesthetic (kept at or above), a max for the probabilities (kept at or below)."""
    side = IMAGE_RULE_SIDES[score]
    values = {(r["shard"], r["key"], r["occurrence"]): r[score] for r in rows if r.get(score) is not None}
    scores = list(values.values())
    if side == "min":
        limit = threshold_for_keep_rate(scores, keep_rate)
        kept = sum(v >= limit for v in scores)
    else:
        limit = -threshold_for_keep_rate([-v for v in scores], keep_rate)
        kept = sum(v <= limit for v in scores)
    return {"rule": side, "threshold": limit, "keep_rate": kept / len(scores), "images": len(scores)}


def best_score(
    rows: list[dict], *, scores: tuple[str, ...] = FILTER_SCORES, beta: float = 0.5, min_precision: float | None = None
) -> tuple[str, dict]:
    """The score whose calibrated thresholds separate the labels best, with those thresholds.

    Best = the highest mean over sources of F-beta (of recall when `min_precision` is set); a
    score that cannot reach `min_precision` on some source is out of the running."""
    results, errors = {}, []
    for score in scores:
        try:
            result = calibrate_run(rows, beta=beta, min_precision=min_precision, score=score)
        except ValueError as err:
            errors.append(f"{score}: {err}")
            continue
        if result:
            results[score] = result
    if not results:
        raise ValueError("no score could be calibrated: " + "; ".join(errors or ["no labelled scores"]))

    def objective(score: str) -> float:
        per_source = results[score].values()
        return sum(r["recall"] if min_precision is not None else r["f"] for r in per_source) / len(per_source)

    chosen = max(results, key=objective)  # ties go to the first listed (ITM, as BLIP filters)
    return chosen, results[chosen]


def check_run(path: str) -> str:
    """A finished or running `capfilt run` output with a ledger (a local path, or the URL it was
    written to), or a one-line error saying why not."""
    from capfilt.io.folder import is_local, local_path
    from capfilt.io.names import RUN_FILE
    from capfilt.io.run_dir import is_run, ledger_files

    if is_local(path):
        run_dir = local_path(path)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{path}: no such directory; give the --output of a `capfilt run`")
        if not (run_dir / RUN_FILE).is_file():
            rounds = sorted(run_dir.glob(f"round-*/capfilt*/{RUN_FILE}"))
            hint = (
                f" (a loop output: calibrate one of its runs, e.g. {rounds[-1].parent})"
                if rounds
                else "; give the --output of a `capfilt run`"
            )
            raise FileNotFoundError(f"{path} is not a capfilt run (no run.json){hint}")
    elif not is_run(path):
        raise FileNotFoundError(f"{path} is not a capfilt run (no run.json); give the --output of a `capfilt run`")
    if not ledger_files(path):
        raise FileNotFoundError(f"{path} has no ledger yet: none of its shards has finished")
    return path


def calibrate(
    run_dir: str,
    *,
    score: str = "itm",
    keep_rate: list[str] | None = None,
    beta: float = 0.5,
    min_precision: float | None = None,
) -> tuple[str, dict, list[str]]:
    """`capfilt calibrate`: thresholds for a run, as (score, result, notes). ``keep_rate`` holds
    the command's ``SOURCE=RATE`` items (``image=RATE`` for decide's image rules); without it the
    run's labelled texts choose (``score="auto"``: the score too). ``notes`` say which sources
    were left uncalibrated and why."""
    from capfilt.config import ConfigError
    from capfilt.io.run_dir import read_ledger

    run_dir = check_run(run_dir)
    if score in IMAGE_RULE_SIDES:  # decide's image rules: one score per image
        rate = _image_rate(score, keep_rate or [])  # refused before the ledger is read
        return score, calibrate_image(read_ledger(run_dir), score, rate), []
    if keep_rate and score == "auto":
        raise ConfigError("--score auto chooses by labels; with --keep-rate name the score to threshold")
    if keep_rate:
        rows = read_ledger(run_dir)
        result = calibrate_run(rows, keep_rate=parse_keep_rates(keep_rate), score=score)
    else:
        from capfilt.synthetic.truth import labelled_ledger

        rows = labelled_ledger(run_dir)
        if not rows:
            raise ValueError(
                f"no labelled texts in {run_dir}: its input samples carry no ground truth; "
                "choose thresholds by --keep-rate web=RATE synthetic=RATE instead"
            )
        if score == "auto":
            score, result = best_score(rows, scores=SCORES, beta=beta, min_precision=min_precision)
        else:
            result = calibrate_run(rows, beta=beta, min_precision=min_precision, score=score)
    scored = {r["source"] for r in rows if r.get(score) is not None}
    if not result:
        raise ValueError(
            f"{run_dir}: no {score} scores to calibrate"
            + (f" for {', '.join(keep_rate)}" if keep_rate else "")
            + (f" (it has {score} scores for: {', '.join(sorted(scored))})" if scored else "")
        )
    notes = [
        f"{source} texts not calibrated: "
        + ("no --keep-rate for it and no labels" if source in scored else f"no {score} scores")
        for source in SOURCES
        if source not in result
    ]
    return score, result, notes


def _image_rate(score: str, keep_rate: list[str]) -> float:
    """The ``image=RATE`` item an image rule is calibrated by."""
    from capfilt.config import ConfigError

    rates = dict(item.partition("=")[::2] for item in keep_rate)
    if set(rates) != {"image"}:
        raise ConfigError(f"--score {score} thresholds images: give --keep-rate image=RATE (e.g. image=0.8)")
    try:
        rate = float(rates["image"])
    except ValueError:
        raise ConfigError(f"--keep-rate image={rates['image']}: the rate must be a number in (0, 1]") from None
    return rate


def recipe_lines(score: str, result: dict) -> list[str]:
    """The ``decide`` section that applies `calibrate`'s result, as recipe lines."""
    if "rule" in result:  # an image rule
        return ["decide:", f"  {score}: {{{result['rule']}: {result['threshold']:.4f}}}"]
    return ["decide:", *(f"  {source}: {{{score}: {r['threshold']:.4f}}}" for source, r in result.items())]
