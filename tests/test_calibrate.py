import json
from pathlib import Path

import pytest

from capfilt.calibrate import (
    best_score,
    calibrate_run,
    parse_keep_rates,
    precision_recall,
    threshold_for_keep_rate,
    threshold_from_labels,
)


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
    rows = [{"source": "web", "itm": s, "correct": s > 0.5} for s in (0.2, 0.4, 0.6, 0.8)] + [
        {"source": "synthetic", "itm": s, "correct": True} for s in (0.1, 0.9)
    ]
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


# --------------------------------------------------------------------------- runs without labels, sources, the CLI


def test_keep_rate_without_labels_calibrates_only_the_sources_named():
    """A real run's ledger has no `correct` labels: a keep rate works, a source without one is skipped."""
    rows = (
        [{"source": "web", "itm": s} for s in (0.1, 0.2, 0.3, 0.4, 0.5)]
        + [{"source": "synthetic", "itm": s} for s in (0.6, 0.7)]
        + [{"source": None, "itm": None}]
    )  # a failed sample
    out = calibrate_run(rows, keep_rate={"web": 0.6})
    assert list(out) == ["web"] and out["web"] == {"threshold": 0.3, "keep_rate": 0.6}  # no precision/recall
    both = calibrate_run(rows, keep_rate={"web": 0.6, "synthetic": 0.5})
    assert both["synthetic"] == {"threshold": 0.7, "keep_rate": 0.5}


def test_unknown_sources_and_bad_rates_are_named():
    assert parse_keep_rates(["web=0.6", "synthetic=1"]) == {"web": 0.6, "synthetic": 1.0}
    with pytest.raises(ValueError, match="unknown source 'webb'; the sources are web, synthetic"):
        parse_keep_rates(["webb=0.6"])
    with pytest.raises(ValueError, match="expects SOURCE=RATE"):
        parse_keep_rates(["web"])
    with pytest.raises(ValueError, match=r"the rate must be in \(0, 1\]"):
        parse_keep_rates(["web=1.5"])
    with pytest.raises(ValueError, match="unknown source"):
        calibrate_run([], keep_rate={"captions": 0.5})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from capfilt.cli import main
    from capfilt.synthetic import main_synth

    data = tmp_path_factory.mktemp("data")
    main_synth(data, shards=1, per_shard=8, seed=2)
    out = tmp_path_factory.mktemp("run") / "out"
    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "demo" / "tiny.yaml"
    assert main(["run", str(recipe), "--input", str(data / "00000.tar"), "--output", str(out), "--quiet"]) == 0
    return out


def test_cli_keep_rate_on_a_run_without_labels(tiny_run, capsys):
    from capfilt.cli import main

    assert main(["calibrate", str(tiny_run), "--keep-rate", "web=0.6"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.split("# paste")[0])
    assert result["score"] == "itm" and set(result) == {"score", "web"} and "precision" not in result["web"]
    assert "synthetic texts not calibrated: no --keep-rate for it and no labels" in captured.err
    assert main(["calibrate", str(tiny_run), "--keep-rate", "web=0.6", "synthetic=0.5", "--score", "clip"]) == 0
    assert set(json.loads(capsys.readouterr().out.split("# paste")[0])) == {"score", "web", "synthetic"}
    # The synthetic world's samples carry their truth: from labels, with precision and recall.
    assert main(["calibrate", str(tiny_run)]) == 0
    assert {"precision", "recall"} <= set(json.loads(capsys.readouterr().out.split("# paste")[0])["web"])


def test_cli_rejects_unknown_sources_and_folders_that_are_not_runs(tiny_run, tmp_path, capsys):
    from capfilt.cli import main

    assert main(["calibrate", str(tiny_run), "--keep-rate", "captions=0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "capfilt: error: --keep-rate captions=0.5: unknown source 'captions'; the sources are web, synthetic"
    )
    assert main(["calibrate", str(tmp_path), "--keep-rate", "web=0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"capfilt: error: {tmp_path} is not a capfilt run (no run.json); give the --output of a `capfilt run`"
    )
    assert main(["calibrate", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- a clip chain's scores


def test_a_clip_chains_scores_calibrate_per_model():
    """`clip` is the chain's last model's score: calibrated over the texts the chain passed on (a
    `decide` threshold never sees the others); `clip.K` is model K's, over every text it scored."""
    from capfilt.calibrate import score_value

    cut = "not_in_clip_top_k"
    rows = [
        {"source": "synthetic", "reason": "", "clip": 0.30, "clip_scores": [0.20, 0.30]},
        {"source": "synthetic", "reason": "", "clip": 0.25, "clip_scores": [0.40, 0.25]},
        {"source": "synthetic", "reason": cut, "clip": 0.10, "clip_scores": [0.30, 0.10]},  # cut by model 1
        {"source": "synthetic", "reason": cut, "clip": None, "clip_scores": [0.05, None]},  # cut by model 0
        {"source": "web", "reason": "", "clip": 0.5, "clip_scores": [0.6, 0.5]},
    ]
    assert [score_value(r, "clip") for r in rows] == [0.30, 0.25, None, None, 0.5]
    assert [score_value(r, "clip.0") for r in rows] == [0.20, 0.40, 0.30, 0.05, 0.6]
    assert [score_value(r, "clip.1") for r in rows] == [0.30, 0.25, 0.10, None, 0.5]
    assert score_value(rows[0], "clip.2") is None
    one = {"source": "web", "reason": "", "clip": 0.7, "clip_scores": None}  # a one-model chain's ledger row
    assert score_value(one, "clip.0") == score_value(one, "clip") == 0.7 and score_value(one, "clip.1") is None
    last = calibrate_run(rows, keep_rate={"synthetic": 0.5}, score="clip")
    assert last["synthetic"] == {"threshold": 0.30, "keep_rate": 0.5}  # of the 2 texts the chain passed on
    first = calibrate_run(rows, keep_rate={"synthetic": 0.5, "web": 1.0}, score="clip.0")
    assert first["synthetic"] == {"threshold": 0.30, "keep_rate": 0.5} and first["web"]["threshold"] == 0.6
    labelled = [{**r, "correct": r["clip_scores"][0] >= 0.3} for r in rows if r["source"] == "synthetic"]
    assert calibrate_run(labelled, score="clip.0")["synthetic"]["threshold"] == 0.30
