import pytest

from capfilt.calibrate import best_score, calibrate_run, precision_recall, threshold_for_keep_rate, threshold_from_labels


def test_keep_rate_threshold_keeps_that_share():
    scores = [i / 10 for i in range(10)]
    t = threshold_for_keep_rate(scores, 0.3)
    assert t == pytest.approx(0.7) and sum(s >= t for s in scores) == 3


def test_labels_pick_the_separating_threshold():
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    labels = [False, False, False, True, True, True]
    best = threshold_from_labels(scores, labels)
    assert best["threshold"] == 0.6 and best["precision"] == 1.0 and best["recall"] == 1.0
    assert precision_recall(scores, labels, 0.3) == (0.75, 1.0)


def test_min_precision_gives_the_most_recall_at_that_precision():
    scores = [0.1, 0.4, 0.5, 0.6, 0.8]
    labels = [False, True, False, True, True]
    best = threshold_from_labels(scores, labels, min_precision=0.75)
    assert best["threshold"] == 0.4 and best["precision"] == 0.75 and best["recall"] == 1.0
    with pytest.raises(ValueError):
        threshold_from_labels([0.1, 0.2, 0.3], [True, False, False], min_precision=0.9)


def test_no_positive_label_keeps_nothing():
    best = threshold_from_labels([0.1, 0.2], [False, False])
    assert best["threshold"] > 0.2 and best["recall"] == 0.0


def test_calibrate_run_per_source():
    rows = [{"source": "web", "itm": s, "correct": s > 0.5} for s in (0.2, 0.4, 0.6, 0.8)] + \
           [{"source": "synthetic", "itm": s, "correct": True} for s in (0.1, 0.9)]
    out = calibrate_run(rows, keep_rate={"synthetic": 0.5})
    assert out["web"]["threshold"] == 0.6
    assert out["synthetic"]["threshold"] == 0.9 and out["synthetic"]["keep_rate"] == 0.5


def _rows(itm, itc, correct, source="web"):
    return [{"source": source, "itm": a, "itc": b, "correct": c} for a, b, c in zip(itm, itc, correct)]


def test_best_score_picks_the_score_that_separates_the_labels():
    correct = [False, False, True, True]
    # ITM mixes the classes, ITC separates them: ITC wins, with its own threshold.
    rows = _rows([0.2, 0.8, 0.3, 0.7], [0.10, 0.12, 0.30, 0.35], correct)
    score, thresholds = best_score(rows, beta=1.0)
    assert score == "itc" and thresholds["web"]["threshold"] == 0.30 and thresholds["web"]["precision"] == 1.0
    # The other way round, ITM wins.
    rows = _rows([0.1, 0.2, 0.8, 0.9], [0.30, 0.10, 0.35, 0.12], correct)
    assert best_score(rows, beta=1.0)[0] == "itm"


def test_best_score_skips_a_score_that_cannot_reach_the_precision():
    correct = [False, True, False, True]
    rows = _rows([0.9, 0.1, 0.8, 0.2], [0.1, 0.5, 0.2, 0.6], correct)  # ITM is upside down
    score, thresholds = best_score(rows, min_precision=0.99)
    assert score == "itc" and thresholds["web"]["recall"] == 1.0
    with pytest.raises(ValueError, match="no score could be calibrated"):
        best_score(rows, scores=("itm",), min_precision=0.99)
