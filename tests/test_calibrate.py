import pytest

from capfilt.calibrate import calibrate_run, precision_recall, threshold_for_keep_rate, threshold_from_labels


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
